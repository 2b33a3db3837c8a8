use xlstm_forecast::data::ChannelMatrix;
use xlstm_forecast::forecast::synthetic::{
    DEFAULT_START_MICROS, PLANT_DAYS, PLANT_REGIMES, SyntheticKind, SyntheticSpec, generate,
    generate_with_latent,
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
    // A year: the plant's regimes (each with its own daily shape) come and go over weeks.
    let series = generate(&SyntheticSpec::new(SyntheticKind::Hourly, 24 * 365, 3, 1)).unwrap();
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
fn ten_minute_series_repeat_daily_every_144_rows() {
    let series = generate(&SyntheticSpec::new(
        SyntheticKind::TenMinutes,
        144 * 7 * 16,
        2,
        4,
    ))
    .unwrap();
    assert_eq!(series.step_micros, 600_000_000);
    let values = channel(&series.matrix, 0);
    // A 150-step cycle drifts by an hour a day; over sixteen weeks it mixes every hour.
    assert!(
        profile_range(&values, 144) > 2.0 * profile_range(&values, 150),
        "daily range {} vs 150-step range {}",
        profile_range(&values, 144),
        profile_range(&values, 150)
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

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn the_last_channel_is_a_temperature_that_loads_answer_in_a_v() {
    // Two years, like the accuracy report's series.
    let (series, latent) =
        generate_with_latent(&SyntheticSpec::new(SyntheticKind::Hourly, 17_420, 3, 1)).unwrap();
    assert_eq!(latent.temperature_channel, Some(2));
    let temperature = channel(&series.matrix, 2);
    assert_eq!(temperature.len(), latent.temperature.len());
    assert!(
        temperature
            .iter()
            .zip(&latent.temperature)
            .all(|(written, exact)| (written - exact).abs() < 1e-3)
    );
    // A plausible climate: frosts and heat, and a daily cycle.
    let coldest = temperature.iter().cloned().fold(f64::MAX, f64::min);
    let warmest = temperature.iter().cloned().fold(f64::MIN, f64::max);
    assert!(coldest < 0.0 && warmest > 25.0, "{coldest} .. {warmest}");
    assert!(profile_range(&temperature, 24) > 3.0 * profile_range(&temperature, 25));
    // Loads answer the temperature in a V: from one day to the next, at the same hour and in
    // the same plant regime, a colder day raises the load when it is cold (heating) and a
    // warmer day raises it when it is hot (cooling). No linear function of the temperature
    // does both.
    for load in 0..2 {
        let values = channel(&series.matrix, load);
        let weekend = |row: usize| {
            let day = (DEFAULT_START_MICROS / 3_600_000_000 + row as i64) / 24;
            (day + 3).rem_euclid(7) >= 5
        };
        let (mut cold, mut hot) = (Vec::new(), Vec::new());
        for row in 3..values.len() - 24 {
            let next = row + 24;
            if latent.plant_regime[row] != latent.plant_regime[next]
                || weekend(row) != weekend(next)
            {
                continue;
            }
            // The response lags the weather by a few hours.
            let (before, after) = (latent.temperature[row - 2], latent.temperature[next - 2]);
            let pair = (after - before, values[next] - values[row]);
            if before < 9.0 && after < 9.0 {
                cold.push(pair);
            } else if before > 23.0 && after > 23.0 {
                hot.push(pair);
            }
        }
        let slope = |pairs: &[(f64, f64)]| {
            let dt: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let dl: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let (mt, ml) = (mean(&dt), mean(&dl));
            let covariance: f64 = dt.iter().zip(&dl).map(|(t, l)| (t - mt) * (l - ml)).sum();
            covariance / dt.iter().map(|t| (t - mt).powi(2)).sum::<f64>()
        };
        assert!(
            cold.len() > 200 && hot.len() > 100,
            "{} {}",
            cold.len(),
            hot.len()
        );
        let (cold, hot) = (slope(&cold), slope(&hot));
        assert!(
            cold < -0.01 && hot > 0.01,
            "load {load}: slope when cold {cold}, when hot {hot}"
        );
    }
}

#[test]
fn plant_regimes_persist_for_days_and_change_the_daily_shape() {
    let (series, latent) =
        generate_with_latent(&SyntheticSpec::new(SyntheticKind::Hourly, 24 * 365, 3, 4)).unwrap();
    let regimes = &latent.plant_regime;
    // Regimes change only at midnight and last 4 to 21 days.
    let mut run_start = 0;
    let mut runs = Vec::new();
    for row in 1..regimes.len() {
        if regimes[row] != regimes[row - 1] {
            assert_eq!(row % 24, 0, "a change at row {row}, not at midnight");
            runs.push(row - run_start);
            run_start = row;
        }
    }
    assert!(runs.len() > 12, "{} changes in a year", runs.len());
    // The first run may be cut by the start of the series.
    let days = (*PLANT_DAYS.start() as usize * 24)..=(*PLANT_DAYS.end() as usize * 24);
    assert!(
        runs[1..].iter().all(|hours| days.contains(hours)),
        "{runs:?}"
    );
    let mut seen = [false; PLANT_REGIMES];
    for regime in regimes {
        seen[usize::from(*regime)] = true;
    }
    assert!(seen.iter().all(|seen| *seen));
    // The regime is visible in the loads' daily shape: afternoon (15:00) against night
    // (02:00) is up in production and down in night operation.
    let load = channel(&series.matrix, 0);
    let ratio = |regime: u8| {
        let at = |hour: usize| {
            let picked: Vec<f64> = (0..load.len())
                .filter(|row| row % 24 == hour && regimes[*row] == regime)
                .map(|row| load[row])
                .collect();
            mean(&picked)
        };
        at(15) - at(2)
    };
    let (production, night) = (ratio(1), ratio(2));
    assert!(
        production > 0.3 && night < -0.2,
        "production {production}, night operation {night}"
    );
    // Weather regimes persist too: the temperature a day later is much the same weather.
    let changes = latent
        .weather_regime
        .windows(2)
        .filter(|pair| pair[0] != pair[1])
        .count();
    assert!((365 / 8..=365).contains(&changes), "{changes}");
}

#[test]
fn loads_run_into_their_capacity_some_of_the_time() {
    let (_, latent) =
        generate_with_latent(&SyntheticSpec::new(SyntheticKind::Hourly, 17_420, 4, 1)).unwrap();
    assert_eq!(latent.capacity.len(), 3);
    assert_eq!(latent.saturated_share.len(), 3);
    // Peaks are clipped often enough to matter, but the capacity is not the normal state.
    for (load, share) in latent.saturated_share.iter().enumerate() {
        assert!((0.005..0.25).contains(share), "load {load}: {share}");
    }
}
