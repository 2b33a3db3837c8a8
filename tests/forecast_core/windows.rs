use xlstm_forecast::forecast::{ForecastError, SplitRows, SplitSpec, WindowSet, ZScore};

use xlstm_forecast::data::CALENDAR_FEATURES;

use super::common::matrix;

fn message(error: ForecastError) -> String {
    error.to_string()
}

#[test]
fn etth1_sized_splits_give_the_published_window_counts() {
    // 12/4/4 months of 30 days × 24 hourly rows; ETTh1 itself has 17,420 rows.
    let split = SplitSpec::parse_rows("8640,2880,2880")
        .unwrap()
        .resolve(17_420)
        .unwrap();
    assert_eq!(
        split,
        SplitRows {
            train: 8640,
            validation: 2880,
            test: 2880
        }
    );
    let test = split.test_windows(336, 96).unwrap();
    assert_eq!(test.count, 2880 - 96 + 1);
    assert_eq!(test.count, 2785);
    // The first test window's lookback reaches back into the validation rows.
    assert_eq!(test.first_start, 8640 + 2880 - 336);
    assert_eq!(test.start(test.count - 1) + 336 + 96, 8640 + 2880 + 2880);
    let validation = split.validation_windows(336, 96).unwrap();
    assert_eq!(
        (validation.first_start, validation.count),
        (8640 - 336, 2785)
    );
    let train = split.train_windows(336, 96).unwrap();
    assert_eq!((train.first_start, train.count), (0, 8640 - 336 - 96 + 1));
}

#[test]
fn fractions_round_train_and_test_down_and_give_validation_the_rest() {
    let split = SplitSpec::parse_fractions("0.7,0.1,0.2")
        .unwrap()
        .resolve(1001)
        .unwrap();
    // floor(700.7) = 700, floor(200.2) = 200, 1001 - 900 = 101.
    assert_eq!(
        split,
        SplitRows {
            train: 700,
            validation: 101,
            test: 200
        }
    );
    let split = SplitSpec::parse_fractions("0.6,0.2,0.2")
        .unwrap()
        .resolve(17_420)
        .unwrap();
    assert_eq!(
        split,
        SplitRows {
            train: 10_452,
            validation: 3484,
            test: 3484
        }
    );
    // Fractions summing to less than one leave the tail unused.
    let split = SplitSpec::parse_fractions("0.5,0.1,0.1")
        .unwrap()
        .resolve(100)
        .unwrap();
    assert_eq!(
        split,
        SplitRows {
            train: 50,
            validation: 10,
            test: 10
        }
    );
}

#[test]
fn bad_split_specs_name_the_argument_and_the_problem() {
    let wrong_count = message(SplitSpec::parse_rows("8640,2880").unwrap_err());
    assert!(
        wrong_count.contains("split-rows") && wrong_count.contains("three"),
        "{wrong_count}"
    );
    let not_a_number = message(SplitSpec::parse_rows("8640,x,2880").unwrap_err());
    assert!(not_a_number.contains("'x'"), "{not_a_number}");
    let too_much = message(SplitSpec::parse_fractions("0.7,0.2,0.2").unwrap_err());
    assert!(
        too_much.starts_with("split:") && too_much.contains("more than 1"),
        "{too_much}"
    );
    let out_of_range = message(SplitSpec::parse_fractions("0.7,0,0.3").unwrap_err());
    assert!(out_of_range.contains("'0'"), "{out_of_range}");
    let too_many_rows = message(
        SplitSpec::parse_rows("10,10,10")
            .unwrap()
            .resolve(25)
            .unwrap_err(),
    );
    assert!(
        too_many_rows.contains("30 rows requested") && too_many_rows.contains("25 rows"),
        "{too_many_rows}"
    );
    let empty_split = message(
        SplitSpec::parse_fractions("0.9,0.05,0.05")
            .unwrap()
            .resolve(10)
            .unwrap_err(),
    );
    assert!(empty_split.contains("without rows"), "{empty_split}");
}

#[test]
fn windows_that_do_not_fit_name_lookback_or_horizon() {
    let split = SplitRows {
        train: 100,
        validation: 20,
        test: 20,
    };
    let long_lookback = message(split.train_windows(90, 20).unwrap_err());
    assert!(
        long_lookback.starts_with("lookback:") && long_lookback.contains("100 training rows"),
        "{long_lookback}"
    );
    let long_horizon = message(split.test_windows(10, 21).unwrap_err());
    assert!(
        long_horizon.starts_with("horizon:") && long_horizon.contains("20 test rows"),
        "{long_horizon}"
    );
    let zero = message(split.test_windows(0, 5).unwrap_err());
    assert!(zero.starts_with("lookback:"), "{zero}");
    // Validation windows may not reach before row 0.
    let reaching_back = message(split.validation_windows(101, 5).unwrap_err());
    assert!(reaching_back.starts_with("lookback:"), "{reaching_back}");
}

#[test]
fn extracted_windows_hold_the_lookback_and_the_horizon_rows() {
    let series = matrix(10, 2, |row, channel| (row * 10 + channel) as f64);
    let windows = WindowSet {
        first_start: 1,
        count: 3,
        stride: 2,
    };
    let (inputs, targets) = windows.extract(&series, 1..3, 3, 2).unwrap();
    assert_eq!((inputs.batch, inputs.lookback, inputs.channels), (2, 3, 2));
    // Window 1 starts at row 3: lookback rows 3..6, horizon rows 6..8.
    assert_eq!(inputs.values[..6], [30.0, 31.0, 40.0, 41.0, 50.0, 51.0]);
    assert_eq!(targets.values[..4], [60.0, 61.0, 70.0, 71.0]);
    // Window 2 starts at row 5.
    assert_eq!(inputs.values[6..], [50.0, 51.0, 60.0, 61.0, 70.0, 71.0]);
    assert_eq!(targets.values[4..], [80.0, 81.0, 90.0, 91.0]);
    let past_the_end = windows.extract(&series, 0..4, 3, 2).unwrap_err();
    assert!(message(past_the_end).starts_with("windows:"));
    assert_eq!(inputs.calendar, None);
}

#[test]
fn windows_carry_the_calendar_of_their_last_lookback_row() {
    let mut series = matrix(10, 2, |row, channel| (row * 10 + channel) as f64);
    // Row r's features are r + 0.0, r + 0.1, …, r + 0.5.
    series.calendar = Some(
        (0..10)
            .flat_map(|row| (0..CALENDAR_FEATURES).map(move |f| row as f32 + f as f32 / 10.0))
            .collect(),
    );
    let windows = WindowSet {
        first_start: 1,
        count: 3,
        stride: 2,
    };
    let (inputs, _) = windows.extract(&series, 1..3, 3, 2).unwrap();
    let calendar = inputs.calendar.unwrap();
    assert_eq!(calendar.len(), 2 * CALENDAR_FEATURES);
    // Window 1's lookback is rows 3..6, window 2's rows 5..8.
    assert_eq!(calendar[0], 5.0);
    assert_eq!(calendar[CALENDAR_FEATURES], 7.0);
    assert!((calendar[CALENDAR_FEATURES + 5] - 7.5).abs() < 1e-6);
}

#[test]
fn streaming_blocks_cover_every_window_once() {
    let series = matrix(50, 1, |row, _| row as f64);
    let windows = WindowSet {
        first_start: 0,
        count: 37,
        stride: 1,
    };
    let mut first_values = Vec::new();
    windows
        .for_each_block(&series, 10, 4, 8, |inputs, _| {
            assert!(inputs.batch <= 8);
            first_values.extend((0..inputs.batch).map(|window| inputs.values[window * 10]));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        first_values,
        (0..37).map(|row| row as f32).collect::<Vec<_>>()
    );
}

#[test]
fn z_scores_use_the_training_rows_population_statistics() {
    // Channel 0 training rows: 1, 2, 3, 6 → mean 3, population variance (4 + 1 + 0 + 9) / 4.
    let training = [1.0, 2.0, 3.0, 6.0];
    let mut series = matrix(6, 2, |row, channel| match channel {
        0 => training.get(row).copied().unwrap_or(100.0),
        _ => 5.0,
    });
    series.missing[2] = true; // row 1, channel 0: ignored by the statistics
    series.values[2] = 0.0;
    let z = ZScore::fit(&series, 0..4).unwrap();
    // Without row 1: 1, 3, 6 → mean 10/3, variance ((7/3)² + (1/3)² + (8/3)²) / 3 = 114/27.
    assert!((z.mean[0] - 10.0 / 3.0).abs() < 1e-12);
    assert!((z.std[0] - (114.0_f64 / 27.0).sqrt()).abs() < 1e-12);
    // A constant channel keeps scale 1 instead of dividing by zero.
    assert_eq!((z.mean[1], z.std[1]), (5.0, 1.0));
    z.apply(&mut series);
    let expected = ((100.0 - 10.0 / 3.0) / (114.0_f64 / 27.0).sqrt()) as f32;
    assert!((series.values[4 * 2] - expected).abs() < 1e-4);
    assert_eq!(series.values[2], 0.0, "missing cells stay 0");
    assert_eq!(series.values[1], 0.0);
}
