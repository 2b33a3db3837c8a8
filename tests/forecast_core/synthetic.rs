use xlstm_forecast::data::ChannelMatrix;
use xlstm_forecast::forecast::synthetic::{
    DEFAULT_START_MICROS, SyntheticKind, SyntheticSpec, generate,
};

fn channel(matrix: &ChannelMatrix, channel: usize) -> Vec<f64> {
    (0..matrix.steps)
        .map(|row| f64::from(matrix.values[row * matrix.channels + channel]))
        .collect()
}

/// Max minus min of the means of the values grouped by `row % period`: large for the
/// period of a real season, small for a period that mixes every phase of it.
fn profile_range(values: &[f64], period: usize) -> f64 {
    let mut sums = vec![0.0; period];
    let mut counts = vec![0.0; period];
    for (row, value) in values.iter().enumerate() {
        sums[row % period] += value;
        counts[row % period] += 1.0;
    }
    let means: Vec<f64> = sums
        .iter()
        .zip(&counts)
        .map(|(sum, count)| sum / count)
        .collect();
    means.iter().cloned().fold(f64::MIN, f64::max) - means.iter().cloned().fold(f64::MAX, f64::min)
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let covariance: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let spread = |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>().sqrt();
    covariance / (spread(a, ma) * spread(b, mb))
}

#[test]
fn the_same_seed_gives_the_same_series_and_another_seed_another() {
    let spec = SyntheticSpec::new(SyntheticKind::Hourly, 500, 4, 42);
    let first = generate(&spec).unwrap();
    assert_eq!(first, generate(&spec).unwrap());
    let other = generate(&SyntheticSpec {
        seed: 43,
        ..spec.clone()
    })
    .unwrap();
    assert_ne!(first.matrix.values, other.matrix.values);
    assert_eq!(
        first.channel_names,
        ["channel_1", "channel_2", "channel_3", "channel_4"]
    );
    assert_eq!((first.matrix.steps, first.matrix.channels), (500, 4));
    assert_eq!(first.timestamp_micros(0), DEFAULT_START_MICROS);
    assert_eq!(
        first.timestamp_micros(2) - first.timestamp_micros(1),
        3_600_000_000
    );
    assert!(first.matrix.values.iter().all(|value| value.is_finite()));
}

#[test]
fn series_have_a_daily_season_and_correlated_channels() {
    let series = generate(&SyntheticSpec::new(SyntheticKind::Hourly, 24 * 7 * 8, 3, 1)).unwrap();
    for index in 0..3 {
        let values = channel(&series.matrix, index);
        // Grouped by hour of day the means differ a lot; grouped by a 25-step cycle, which
        // runs through every hour, they hardly do.
        assert!(
            profile_range(&values, 24) > 3.0 * profile_range(&values, 25),
            "channel {index}: daily range {} vs 25-step range {}",
            profile_range(&values, 24),
            profile_range(&values, 25)
        );
    }
    let (first, second) = (channel(&series.matrix, 0), channel(&series.matrix, 1));
    assert!(
        correlation(&first, &second) > 0.3,
        "{}",
        correlation(&first, &second)
    );
}

#[test]
fn fifteen_minute_series_repeat_daily_every_96_rows() {
    let series = generate(&SyntheticSpec::new(
        SyntheticKind::FifteenMinutes,
        96 * 7 * 8,
        2,
        3,
    ))
    .unwrap();
    assert_eq!(series.step_micros, 900_000_000);
    let values = channel(&series.matrix, 0);
    // A 100-step cycle drifts by an hour a day, so over eight weeks it mixes every hour.
    assert!(
        profile_range(&values, 96) > 3.0 * profile_range(&values, 100),
        "daily range {} vs 100-step range {}",
        profile_range(&values, 96),
        profile_range(&values, 100)
    );
}

#[test]
fn a_missing_fraction_leaves_about_that_share_of_cells_missing() {
    let spec = SyntheticSpec {
        missing_fraction: 0.05,
        ..SyntheticSpec::new(SyntheticKind::Hourly, 2000, 5, 9)
    };
    let series = generate(&spec).unwrap();
    let share = series
        .matrix
        .missing
        .iter()
        .filter(|missing| **missing)
        .count() as f64
        / 10_000.0;
    assert!((0.04..0.06).contains(&share), "{share}");
    assert!(
        series
            .matrix
            .missing
            .iter()
            .zip(&series.matrix.values)
            .all(|(missing, value)| !missing || *value == 0.0)
    );
}

#[test]
fn bad_specs_name_the_argument() {
    let error = generate(&SyntheticSpec::new(SyntheticKind::Hourly, 0, 2, 1)).unwrap_err();
    assert!(error.to_string().starts_with("rows:"), "{error}");
    let error = generate(&SyntheticSpec::new(SyntheticKind::Hourly, 10, 0, 1)).unwrap_err();
    assert!(error.to_string().starts_with("channels:"), "{error}");
    let spec = SyntheticSpec {
        missing_fraction: 1.0,
        ..SyntheticSpec::new(SyntheticKind::Hourly, 10, 1, 1)
    };
    assert!(
        generate(&spec)
            .unwrap_err()
            .to_string()
            .starts_with("missing:")
    );
}
