//! CSV ingest against both backends: idempotent upserts, one transaction per import (a bad
//! file writes nothing), time zones and DST, epoch seconds, duplicates and batching.

#[macro_use]
mod common;

use std::io::Cursor;

use chrono::DateTime;
use xlstm_forecast::data::{DataError, Frequency, ImportOptions, ImportReport, import_csv};
use xlstm_forecast::store::{LongObservations, Store};

async fn import(
    store: &dyn Store,
    csv: &str,
    options: &ImportOptions,
) -> Result<ImportReport, DataError> {
    import_csv(store, Cursor::new(csv.as_bytes().to_vec()), options).await
}

fn options(series: &str) -> ImportOptions {
    ImportOptions::new(series)
}

fn micros(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

async fn load(store: &dyn Store, series: &str) -> LongObservations {
    store
        .load_observations(series, None, None, None)
        .await
        .unwrap()
}

/// (channel name, ts, value) triples, in the store's order (ts, then channel).
fn cells(observations: &LongObservations) -> Vec<(String, i64, f64)> {
    (0..observations.ts_micros.len())
        .map(|i| {
            (
                observations.channels[observations.channel[i] as usize].clone(),
                observations.ts_micros[i],
                observations.value[i],
            )
        })
        .collect()
}

async fn observation_count(store: &dyn Store, series: &str) -> u64 {
    store.observation_range(series).await.unwrap().count
}

const GOOD: &str = "ts,temp,load\n\
2024-01-01T00:00:00Z,1.5,10\n\
2024-01-01T01:00:00Z,,11\n\
2024-01-01T02:00:00Z,3.5,\n";

/// `rows` hourly rows from 2024-01-01T00:00Z; a = row, b = 2 * row.
fn hourly_csv(rows: usize) -> String {
    let mut csv = String::from("ts,a,b\n");
    for row in 0..rows {
        csv.push_str(&format!(
            "{},{row},{}\n",
            1_704_067_200 + row * 3600,
            2 * row
        ));
    }
    csv
}

store_tests! {
    async fn import_creates_the_series_and_stores_cells(store) {
        let opts = ImportOptions {
            frequency: Some(Frequency::parse("1h").unwrap()),
            timezone: Some(chrono_tz::Europe::Berlin),
            ..options("s")
        };
        let report = import(store.as_ref(), GOOD, &opts).await.unwrap();
        assert_eq!(report.rows, 3);
        assert_eq!(report.cells, 4);
        assert_eq!(report.channels, vec!["temp", "load"]);
        assert!(report.summary.created_series);
        assert_eq!(report.summary.cells_written, 4);
        assert_eq!(report.summary.first_ts_micros, Some(micros("2024-01-01T00:00:00Z")));
        assert_eq!(report.summary.last_ts_micros, Some(micros("2024-01-01T02:00:00Z")));
        let series = store.get_series("s").await.unwrap().unwrap();
        assert_eq!(series.frequency.as_deref(), Some("1h"));
        assert_eq!(series.timezone, "Europe/Berlin");
        assert_eq!(series.channels, vec!["temp", "load"]);
        assert_eq!(
            cells(&load(store.as_ref(), "s").await),
            vec![
                ("temp".to_string(), micros("2024-01-01T00:00:00Z"), 1.5),
                ("load".to_string(), micros("2024-01-01T00:00:00Z"), 10.0),
                ("load".to_string(), micros("2024-01-01T01:00:00Z"), 11.0),
                ("temp".to_string(), micros("2024-01-01T02:00:00Z"), 3.5),
            ]
        );
    }

    async fn importing_the_same_file_twice_changes_nothing(store) {
        let csv = hourly_csv(500);
        let opts = ImportOptions { batch_rows: 128, ..options("s") };
        import(store.as_ref(), &csv, &opts).await.unwrap();
        let first = load(store.as_ref(), "s").await;
        let again = import(store.as_ref(), &csv, &opts).await.unwrap();
        assert!(!again.summary.created_series);
        assert_eq!(observation_count(store.as_ref(), "s").await, 1000);
        assert_eq!(load(store.as_ref(), "s").await, first);
    }

    async fn reimport_with_changed_values_updates_them(store) {
        import(store.as_ref(), GOOD, &options("s")).await.unwrap();
        import(store.as_ref(), "ts,load\n2024-01-01T01:00:00Z,99\n", &options("s")).await.unwrap();
        let stored = cells(&load(store.as_ref(), "s").await);
        assert_eq!(stored.len(), 4);
        assert!(stored.contains(&("load".to_string(), micros("2024-01-01T01:00:00Z"), 99.0)));
    }

    async fn bad_files_write_nothing_and_name_line_and_column(store) {
        // An existing series with data, so "nothing written" is checked against real rows.
        import(store.as_ref(), GOOD, &options("s")).await.unwrap();
        let before = load(store.as_ref(), "s").await;
        // Each bad cell sits after the first batch of 2 records, so the session has already
        // written a batch when the error is found.
        let cases: [(&str, Option<&str>, &str); 6] = [
            (
                "ts,temp\n2024-02-01T00:00:00Z,1\n2024-02-01T01:00:00Z,2\n2024-02-01T02:00:00Z,3\nnot a time,4\n",
                None,
                "line 5, column 'ts': cannot parse timestamp 'not a time'",
            ),
            (
                "ts,temp,load\n2024-02-01T00:00:00Z,1,1\n2024-02-01T01:00:00Z,2,2\n2024-02-01T02:00:00Z,3,warm\n",
                None,
                "line 4, column 'load': expected a number, found 'warm'",
            ),
            (
                "ts,temp\n2024-02-01T00:00:00Z,1\n2024-02-01T01:00:00Z,2\n2024-02-01T02:00:00Z,NaN\n",
                None,
                "line 4, column 'temp': value must be finite, found 'NaN'",
            ),
            (
                "ts,temp\n2024-02-01T00:00:00Z,1\n2024-02-01T01:00:00Z,2\n2024-02-01T02:00:00Z,inf\n",
                None,
                "line 4, column 'temp': value must be finite, found 'inf'",
            ),
            ("ts,temp,humidity\n2024-02-01T00:00:00Z,1,2\n", None, "column 'humidity': not a channel of existing series 's'"),
            ("when,temp\n2024-02-01T00:00:00Z,1\n", Some("ts"), "column 'ts': time column not found"),
        ];
        for (csv, time_column, expected) in cases {
            let opts = ImportOptions {
                time_column: time_column.map(str::to_string),
                batch_rows: 2,
                ..options("s")
            };
            let err = import(store.as_ref(), csv, &opts).await.expect_err(expected).to_string();
            assert!(err.starts_with(expected), "expected '{expected}', got '{err}'");
            assert_eq!(load(store.as_ref(), "s").await, before, "after '{expected}'");
        }
    }

    async fn a_failed_import_does_not_create_the_series(store) {
        let cases: [(&str, &str); 7] = [
            ("ts,a\n1,1\n2,2\n3,3\nsoon,4\n", "line 5, column 'ts': cannot parse timestamp 'soon'"),
            ("ts,a\n1,1\n2,2\n3,x\n", "line 4, column 'a': expected a number, found 'x'"),
            ("ts,a\n1,1\n2,2\n3,-Infinity\n", "line 4, column 'a': value must be finite"),
            ("ts\n1\n", "line 1: no value columns"),
            ("", "the CSV file is empty"),
            ("ts,a\n", "the CSV file has a header but no data rows"),
            ("ts,a,a\n1,2,3\n", "line 1, column 'a': duplicate column name"),
        ];
        for (csv, expected) in cases {
            let opts = ImportOptions { batch_rows: 2, ..options("fresh") };
            let err = import(store.as_ref(), csv, &opts).await.expect_err(expected).to_string();
            assert!(err.starts_with(expected), "expected '{expected}', got '{err}'");
            assert!(store.get_series("fresh").await.unwrap().is_none(), "series created by '{expected}'");
        }
    }

    async fn naive_times_use_the_time_zone_and_dst_rules(store) {
        let berlin = ImportOptions {
            timezone: Some(chrono_tz::Europe::Berlin),
            ..options("s")
        };
        // Berlin falls back on 2024-10-27 at 03:00 local (01:00 UTC): 02:30 happens twice and
        // the earlier (summer time, +02:00) instant is taken.
        let csv = "time,v\n\
2024-10-27 01:30:00,1\n\
2024-10-27 02:30:00,2\n\
2024-10-27T03:30:00,3\n\
2024-10-27T02:45:00+01:00,4\n\
2024-07-01,5\n";
        import(store.as_ref(), csv, &berlin).await.unwrap();
        let stored: Vec<i64> = load(store.as_ref(), "s").await.ts_micros;
        assert_eq!(
            stored,
            vec![
                micros("2024-06-30T22:00:00Z"),
                micros("2024-10-26T23:30:00Z"),
                micros("2024-10-27T00:30:00Z"),
                micros("2024-10-27T01:45:00Z"),
                micros("2024-10-27T02:30:00Z"),
            ]
        );
        // Later imports read naive times in the series' zone unless told otherwise.
        import(store.as_ref(), "time,v\n2024-01-01 12:00:00,6\n", &options("s")).await.unwrap();
        let stored = load(store.as_ref(), "s").await.ts_micros;
        assert!(stored.contains(&micros("2024-01-01T11:00:00Z")));
        // Spring forward: 2024-03-31 02:30 does not exist in Berlin.
        let err = import(store.as_ref(), "time,v\n2024-03-31 01:30:00,1\n2024-03-31 02:30:00,2\n", &options("s"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("line 3, column 'time': local time '2024-03-31 02:30:00' does not exist in time zone Europe/Berlin"), "{err}");
        assert_eq!(store.get_series("s").await.unwrap().unwrap().timezone, "Europe/Berlin");
    }

    async fn epoch_seconds_integer_and_fractional(store) {
        import(store.as_ref(), "epoch,v\n1700000000,1\n1700000000.25,2\n-1.5,3\n", &options("s")).await.unwrap();
        assert_eq!(
            load(store.as_ref(), "s").await.ts_micros,
            vec![-1_500_000, 1_700_000_000_000_000, 1_700_000_000_250_000]
        );
    }

    async fn unsorted_rows_and_repeated_timestamps_keep_the_last_value(store) {
        let csv = "ts,a,b\n\
2024-01-01T02:00:00Z,3,30\n\
2024-01-01T00:00:00Z,1,10\n\
2024-01-01T02:00:00Z,4,\n\
2024-01-01T01:00:00Z,2,20\n";
        let report = import(store.as_ref(), csv, &options("s")).await.unwrap();
        assert_eq!(report.rows, 4);
        assert_eq!(
            cells(&load(store.as_ref(), "s").await),
            vec![
                ("a".to_string(), micros("2024-01-01T00:00:00Z"), 1.0),
                ("b".to_string(), micros("2024-01-01T00:00:00Z"), 10.0),
                ("a".to_string(), micros("2024-01-01T01:00:00Z"), 2.0),
                ("b".to_string(), micros("2024-01-01T01:00:00Z"), 20.0),
                ("a".to_string(), micros("2024-01-01T02:00:00Z"), 4.0),
                ("b".to_string(), micros("2024-01-01T02:00:00Z"), 30.0),
            ]
        );
    }

    async fn many_batches_store_every_row(store) {
        let opts = ImportOptions { batch_rows: 333, ..options("s") };
        let report = import(store.as_ref(), &hourly_csv(2_000), &opts).await.unwrap();
        assert_eq!((report.rows, report.summary.cells_written), (2_000, 4_000));
        let observations = load(store.as_ref(), "s").await;
        assert_eq!(observations.value.len(), 4_000);
        let last = cells(&observations).pop().unwrap();
        assert_eq!(last, ("b".to_string(), (1_704_067_200 + 1_999 * 3600) * 1_000_000, 3_998.0));
    }

    async fn quoted_fields_blank_lines_and_crlf(store) {
        let csv = "\"ts\",\"temp, outside\"\r\n\r\n\"2024-01-01T00:00:00Z\",\" 1.5 \"\r\n2024-01-01T01:00:00Z,\"\"\r\n";
        let report = import(store.as_ref(), csv, &options("s")).await.unwrap();
        assert_eq!((report.rows, report.cells), (2, 1));
        assert_eq!(report.channels, vec!["temp, outside"]);
        assert_eq!(load(store.as_ref(), "s").await.value, vec![1.5]);
    }

    async fn a_frequency_different_from_the_series_is_refused(store) {
        let hourly = ImportOptions { frequency: Some(Frequency::parse("1h").unwrap()), ..options("s") };
        import(store.as_ref(), GOOD, &hourly).await.unwrap();
        let daily = ImportOptions { frequency: Some(Frequency::parse("1d").unwrap()), ..options("s") };
        let err = import(store.as_ref(), GOOD, &daily).await.err().unwrap().to_string();
        assert!(err.contains("frequency 1d differs from the frequency 1h"), "{err}");
    }
}
