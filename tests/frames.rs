//! Frames loaded from both backends: pivoting, regularising, averaging, gap filling and the
//! missing mask, frequency inference, calendar features in the series' zone, ranges.

#[macro_use]
mod common;

use std::io::Cursor;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use xlstm_forecast::data::{
    DataError, FrameOptions, Frequency, ImportOptions, SeriesFrame, import_csv, load_frame,
};
use xlstm_forecast::store::Store;

async fn import(
    store: &dyn Store,
    series: &str,
    frequency: Option<&str>,
    timezone: Option<Tz>,
    csv: &str,
) {
    let options = ImportOptions {
        frequency: frequency.map(|text| Frequency::parse(text).unwrap()),
        timezone,
        ..ImportOptions::new(series)
    };
    import_csv(store, Cursor::new(csv.as_bytes().to_vec()), &options)
        .await
        .unwrap();
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

fn values(frame: &SeriesFrame, channel: &str) -> Vec<Option<f64>> {
    frame
        .data
        .column(channel)
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .collect()
}

fn missing(frame: &SeriesFrame, channel: &str) -> Vec<bool> {
    frame
        .missing
        .column(channel)
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .map(|cell| cell.unwrap())
        .collect()
}

fn hours_from(start: &str, frame: &SeriesFrame) -> Vec<i64> {
    let start = at(start).timestamp_micros();
    frame
        .ts_micros()
        .unwrap()
        .iter()
        .map(|ts| (ts - start) / 3_600_000_000)
        .collect()
}

store_tests! {
    async fn unsorted_sub_hourly_data_is_averaged_into_hourly_buckets(store) {
        // Several readings per hour, out of order: each bucket is their mean.
        let csv = "ts,a,b\n\
2024-01-01T01:40:00Z,6,\n\
2024-01-01T00:10:00Z,1,100\n\
2024-01-01T01:00:00Z,2,\n\
2024-01-01T00:50:00Z,3,300\n\
2024-01-01T02:00:00Z,,7\n";
        import(store.as_ref(), "s", Some("1h"), None, csv).await;
        let no_filling = FrameOptions { interpolation_limit: 0, ..FrameOptions::default() };
        let frame = load_frame(store.as_ref(), "s", None, None, &no_filling).await.unwrap();
        assert_eq!(frame.frequency.to_string(), "1h");
        assert_eq!(frame.channels, vec!["a", "b"]);
        assert_eq!(hours_from("2024-01-01T00:00:00Z", &frame), vec![0, 1, 2]);
        assert_eq!(values(&frame, "a"), vec![Some(2.0), Some(4.0), None]);
        assert_eq!(values(&frame, "b"), vec![Some(200.0), None, Some(7.0)]);
        // b at 01:00 lies between 200 and 7: interpolated, so not missing; a at 02:00 has no
        // right neighbour: missing.
        let frame = load_frame(store.as_ref(), "s", None, None, &FrameOptions { interpolation_limit: 1, ..FrameOptions::default() }).await.unwrap();
        assert_eq!(values(&frame, "b"), vec![Some(200.0), Some(103.5), Some(7.0)]);
        assert_eq!(missing(&frame, "a"), vec![false, false, true]);
        assert_eq!(missing(&frame, "b"), vec![false, false, false]);
    }

    async fn missing_buckets_are_inserted_and_filled_up_to_the_limit(store) {
        let csv = "ts,v\n\
2024-01-01T00:00:00Z,0\n\
2024-01-01T03:00:00Z,3\n\
2024-01-01T08:00:00Z,8\n";
        import(store.as_ref(), "s", Some("1h"), None, csv).await;
        let options = FrameOptions { interpolation_limit: 2, ..FrameOptions::default() };
        let frame = load_frame(store.as_ref(), "s", None, None, &options).await.unwrap();
        assert_eq!(hours_from("2024-01-01T00:00:00Z", &frame), (0..=8).collect::<Vec<_>>());
        assert_eq!(
            values(&frame, "v"),
            vec![Some(0.0), Some(1.0), Some(2.0), Some(3.0), None, None, None, None, Some(8.0)]
        );
        assert_eq!(missing(&frame, "v"), vec![false, false, false, false, true, true, true, true, false]);
        let matrix = frame.channel_matrix().unwrap();
        assert_eq!((matrix.steps, matrix.channels), (9, 1));
        assert_eq!(matrix.values, vec![0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 8.0]);
        assert_eq!(matrix.missing, missing(&frame, "v"));
        // With the limit at 4 the long gap is filled as well.
        let options = FrameOptions { interpolation_limit: 4, ..FrameOptions::default() };
        let frame = load_frame(store.as_ref(), "s", None, None, &options).await.unwrap();
        assert_eq!(values(&frame, "v")[4..8], [Some(4.0), Some(5.0), Some(6.0), Some(7.0)]);
    }

    async fn frequency_is_inferred_when_the_series_has_none(store) {
        // Mostly 15-minute steps with one gap of 45 minutes: the step is 15 minutes.
        let csv = "ts,v\n\
2024-01-01T00:00:00Z,0\n\
2024-01-01T00:15:00Z,1\n\
2024-01-01T00:30:00Z,2\n\
2024-01-01T01:15:00Z,5\n";
        import(store.as_ref(), "s", None, None, csv).await;
        let frame = load_frame(store.as_ref(), "s", None, None, &FrameOptions::default()).await.unwrap();
        assert_eq!(frame.frequency, Frequency::parse("15m").unwrap());
        assert_eq!(frame.height(), 6);
        assert_eq!(values(&frame, "v"), vec![Some(0.0), Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(5.0)]);
    }

    async fn calendar_features_use_the_series_time_zone_across_dst(store) {
        // New York springs forward on 2024-03-10 at 07:00 UTC (02:00 EST -> 03:00 EDT).
        let csv = "ts,v\n\
2024-03-10T06:00:00Z,1\n\
2024-03-10T07:00:00Z,2\n\
2024-03-10T08:00:00Z,3\n";
        import(store.as_ref(), "s", Some("1h"), Some(chrono_tz::America::New_York), csv).await;
        let options = FrameOptions { calendar_features: true, ..FrameOptions::default() };
        let frame = load_frame(store.as_ref(), "s", None, None, &options).await.unwrap();
        let sin = values(&frame, "hour_sin");
        let cos = values(&frame, "hour_cos");
        let local_hours: Vec<f64> = (0..3)
            .map(|row| (sin[row].unwrap().atan2(cos[row].unwrap()) / std::f64::consts::TAU * 24.0).rem_euclid(24.0))
            .collect();
        // 01:00 EST, then 03:00 EDT, 04:00 EDT: the local hour jumps by two at the change.
        for (local, expected) in local_hours.iter().zip([1.0, 3.0, 4.0]) {
            assert!((local - expected).abs() < 1e-9, "{local_hours:?}");
        }
        let names: Vec<String> = frame.data.get_column_names().iter().map(|name| name.to_string()).collect();
        assert_eq!(names, vec!["ts", "v", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos", "yearday_sin", "yearday_cos"]);
    }

    async fn range_and_channel_selection(store) {
        let csv = "ts,a,b,c\n\
2024-01-01T00:00:00Z,1,10,100\n\
2024-01-01T01:00:00Z,2,20,200\n\
2024-01-01T02:00:00Z,3,30,300\n\
2024-01-01T03:00:00Z,4,40,400\n";
        import(store.as_ref(), "s", Some("1h"), None, csv).await;
        let options = FrameOptions { channels: Some(vec!["c".to_string(), "a".to_string()]), ..FrameOptions::default() };
        let frame = load_frame(
            store.as_ref(),
            "s",
            Some(at("2024-01-01T01:00:00Z")),
            Some(at("2024-01-01T02:00:00Z")),
            &options,
        )
        .await
        .unwrap();
        assert_eq!(frame.channels, vec!["c", "a"]);
        assert_eq!(hours_from("2024-01-01T00:00:00Z", &frame), vec![1, 2]);
        assert_eq!(frame.channel_matrix().unwrap().values, vec![200.0, 2.0, 300.0, 3.0]);
        let options = FrameOptions { channels: Some(vec!["d".to_string()]), ..FrameOptions::default() };
        let err = load_frame(store.as_ref(), "s", None, None, &options).await.err().unwrap().to_string();
        assert!(err.starts_with("column 'd': not a channel of series 's'"), "{err}");
    }

    async fn unknown_series_is_reported_by_name(store) {
        let err = load_frame(store.as_ref(), "ghost", None, None, &FrameOptions::default()).await.err().unwrap();
        assert!(matches!(&err, DataError::UnknownSeries { name } if name == "ghost"), "{err}");
    }
}
