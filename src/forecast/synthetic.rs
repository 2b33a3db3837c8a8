//! Realistic synthetic multivariate series for the quick start and accuracy reports, shaped
//! like metered load data (the ETT / electricity family):
//!
//! - a shared latent factor: a two-peak daily profile (morning and evening), damped at
//!   weekends, an annual slow swing, and a persistent AR(1) disturbance;
//! - per channel: its own level and linear trend, a loading on the factor, a phase-shifted
//!   daily profile of its own, a lagged effect of the previous channel (channel c follows
//!   channel c − 1 by a few hours), occasional level shifts, and AR(1) noise whose spread
//!   grows with the daily activity (heteroscedastic);
//! - optionally, cells missing completely at random.
//!
//! The same spec and seed always give the same series (`StdRng::seed_from_u64`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

use crate::data::{ChannelMatrix, Frequency};

use super::error::ForecastError;

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const HOURS_PER_YEAR: f64 = 365.25 * 24.0;
/// 2016-07-01T00:00:00Z, where the ETT data sets start.
pub const DEFAULT_START_MICROS: i64 = 1_467_331_200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    Hourly,
    FifteenMinutes,
}

impl SyntheticKind {
    pub fn step_micros(self) -> i64 {
        match self {
            Self::Hourly => MICROS_PER_HOUR,
            Self::FifteenMinutes => MICROS_PER_HOUR / 4,
        }
    }

    pub fn frequency(self) -> Frequency {
        Frequency::from_micros(self.step_micros()).expect("positive step")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub kind: SyntheticKind,
    pub rows: usize,
    pub channels: usize,
    pub seed: u64,
    /// Probability that a cell is missing, in [0, 1).
    pub missing_fraction: f64,
    /// Timestamp of the first row, epoch microseconds (UTC).
    pub start_micros: i64,
}

impl SyntheticSpec {
    pub fn new(kind: SyntheticKind, rows: usize, channels: usize, seed: u64) -> Self {
        Self {
            kind,
            rows,
            channels,
            seed,
            missing_fraction: 0.0,
            start_micros: DEFAULT_START_MICROS,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSeries {
    pub start_micros: i64,
    pub step_micros: i64,
    pub channel_names: Vec<String>,
    pub matrix: ChannelMatrix,
}

impl SyntheticSeries {
    pub fn timestamp_micros(&self, row: usize) -> i64 {
        self.start_micros + row as i64 * self.step_micros
    }
}

/// The daily shape of activity in [0, ~1.1]: a morning peak around 08:00 and a larger
/// evening peak around 19:00 over a night-time floor.
fn daily_profile(hour_of_day: f64) -> f64 {
    let bump = |centre: f64, width: f64| {
        let distance = (hour_of_day - centre).rem_euclid(24.0);
        let distance = distance.min(24.0 - distance);
        (-(distance / width).powi(2)).exp()
    };
    0.15 + 0.7 * bump(8.0, 2.0) + 0.95 * bump(19.0, 2.5)
}

/// Per-channel constants drawn once from the seed.
struct ChannelShape {
    level: f64,
    trend_per_year: f64,
    loading: f64,
    own_daily_amplitude: f64,
    own_phase_hours: f64,
    /// Effect of the previous channel's signal `lag_steps` earlier.
    cross_effect: f64,
    lag_steps: usize,
    noise_scale: f64,
}

pub fn generate(spec: &SyntheticSpec) -> Result<SyntheticSeries, ForecastError> {
    if spec.rows == 0 {
        return Err(ForecastError::invalid("rows", "must be at least 1"));
    }
    if spec.channels == 0 {
        return Err(ForecastError::invalid("channels", "must be at least 1"));
    }
    if !(0.0..1.0).contains(&spec.missing_fraction) {
        return Err(ForecastError::invalid(
            "missing",
            format!(
                "the missing fraction must be in [0, 1), got {}",
                spec.missing_fraction
            ),
        ));
    }
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let standard = Normal::new(0.0, 1.0).expect("valid normal");
    let step_hours = spec.kind.step_micros() as f64 / MICROS_PER_HOUR as f64;
    let steps_per_hour = (1.0 / step_hours).round() as usize;

    let shapes: Vec<ChannelShape> = (0..spec.channels)
        .map(|_| ChannelShape {
            level: 5.0 + 3.0 * standard.sample(&mut rng),
            trend_per_year: 0.8 * standard.sample(&mut rng),
            loading: Uniform::new(0.6, 1.6)
                .expect("valid range")
                .sample(&mut rng),
            own_daily_amplitude: Uniform::new(0.2, 0.8)
                .expect("valid range")
                .sample(&mut rng),
            own_phase_hours: Uniform::new(-3.0, 3.0)
                .expect("valid range")
                .sample(&mut rng),
            cross_effect: Uniform::new(0.2, 0.5)
                .expect("valid range")
                .sample(&mut rng),
            lag_steps: rng.random_range(1..=6) * steps_per_hour,
            noise_scale: Uniform::new(0.1, 0.3)
                .expect("valid range")
                .sample(&mut rng),
        })
        .collect();
    let annual_phase = Uniform::new(0.0, std::f64::consts::TAU)
        .expect("valid range")
        .sample(&mut rng);

    // AR(1) coefficients are set per hour and compounded over the step, so both kinds have
    // the same persistence in time.
    let factor_persistence = 0.97_f64.powf(step_hours);
    let noise_persistence = 0.8_f64.powf(step_hours);
    // A level shift every ~45 days per channel on average.
    let shift_probability = step_hours / (45.0 * 24.0);

    let (rows, channels) = (spec.rows, spec.channels);
    // Each channel's structured signal (without level, trend, shifts and noise), which the
    // next channel's lagged cross-effect reads.
    let mut signal = vec![0.0_f64; rows * channels];
    let mut values = vec![0.0_f32; rows * channels];
    let mut missing = vec![false; rows * channels];
    let mut latent_disturbance = 0.0_f64;
    let mut noise_state = vec![0.0_f64; channels];
    let mut level_shift = vec![0.0_f64; channels];
    let start_hours = spec.start_micros as f64 / MICROS_PER_HOUR as f64;
    for row in 0..rows {
        let hours = start_hours + row as f64 * step_hours;
        let hour_of_day = hours.rem_euclid(24.0);
        // 1970-01-01 was a Thursday; Monday = 0.
        let weekday = ((hours / 24.0).floor() as i64 + 3).rem_euclid(7);
        let weekday_factor = if weekday >= 5 { 0.65 } else { 1.0 };
        let annual = (std::f64::consts::TAU * hours / HOURS_PER_YEAR + annual_phase).sin();
        latent_disturbance = factor_persistence * latent_disturbance
            + (1.0 - factor_persistence * factor_persistence).sqrt() * standard.sample(&mut rng);
        let activity = daily_profile(hour_of_day) * weekday_factor;
        let factor = activity + 0.6 * annual + 0.35 * latent_disturbance;
        let years = row as f64 * step_hours / HOURS_PER_YEAR;
        for (channel, shape) in shapes.iter().enumerate() {
            let own_daily = shape.own_daily_amplitude
                * daily_profile(hour_of_day + shape.own_phase_hours)
                * weekday_factor;
            let cross = if channel > 0 && row >= shape.lag_steps {
                shape.cross_effect * signal[(row - shape.lag_steps) * channels + channel - 1]
            } else {
                0.0
            };
            let structured = shape.loading * factor + own_daily + cross;
            signal[row * channels + channel] = structured;
            if rng.random_bool(shift_probability) {
                level_shift[channel] += 0.8 * standard.sample(&mut rng);
            }
            let spread = shape.noise_scale * (0.4 + activity);
            noise_state[channel] =
                noise_persistence * noise_state[channel] + spread * standard.sample(&mut rng);
            let value = shape.level
                + shape.trend_per_year * years
                + level_shift[channel]
                + structured
                + noise_state[channel];
            let cell = row * channels + channel;
            if spec.missing_fraction > 0.0 && rng.random_bool(spec.missing_fraction) {
                missing[cell] = true;
            } else {
                values[cell] = value as f32;
            }
        }
    }
    Ok(SyntheticSeries {
        start_micros: spec.start_micros,
        step_micros: spec.kind.step_micros(),
        channel_names: (1..=channels)
            .map(|channel| format!("channel_{channel}"))
            .collect(),
        matrix: ChannelMatrix {
            steps: rows,
            channels,
            values,
            missing,
        },
    })
}
