//! Realistic synthetic multivariate series for the quick start and accuracy reports, shaped
//! like metered load and weather data (the ETT / electricity / weather family). Besides
//! seasonalities, trend, level shifts and heteroscedastic noise they carry the nonlinear,
//! state-dependent structure of real meters, for which a fixed linear map of the lookback is
//! not the best forecast:
//!
//! - **weather:** with two or more channels the last one is an outdoor temperature (°C): an
//!   annual cycle, weather regimes of 1.5 to 8 days (each with its own temperature anomaly,
//!   which the weather relaxes towards over about half a day, and its own sky: a daily swing
//!   between the 05:00 low and the 15:00 high of 1 to 7 °C, large when clear, small when
//!   overcast) plus persistent hourly noise;
//! - **operating regimes:** a plant shared by the load channels runs for days to weeks at a
//!   time (4 to 21 days, switching at midnight) in one of three regimes, each with its own
//!   daily shape: normal two-peak office hours damped at weekends, two-shift production (a
//!   plateau from 06:00 to 22:00 every day) and night operation on the off-peak tariff (a
//!   plateau from 22:00 to 06:00, low by day);
//! - per load channel: its own level, linear trend and occasional level shifts; a loading on
//!   the plant's activity and a phase-shifted daily profile of its own, both scaled
//!   **multiplicatively** by a slowly varying level (an annual swing and a persistent AR(1)
//!   disturbance), so the daily amplitude grows and shrinks with the level; a **V-shaped
//!   response to the temperature** (heating below 15 °C, cooling above 21 °C, none in between)
//!   that lags the weather by a few hours; a lagged linear effect of the previous load channel;
//!   AR(1) noise whose spread grows with the activity (heteroscedastic); and a soft
//!   **saturation at the channel's capacity**;
//! - optionally, cells missing completely at random.
//!
//! Everything runs in one pass over the rows. The same spec and seed always give the same
//! series (`StdRng::seed_from_u64`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

use crate::data::{ChannelMatrix, Frequency, calendar_rows};

use super::error::ForecastError;

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const HOURS_PER_YEAR: f64 = 365.25 * 24.0;
/// 2016-07-01T00:00:00Z, where the ETT data sets start.
pub const DEFAULT_START_MICROS: i64 = 1_467_331_200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    Hourly,
    FifteenMinutes,
    TenMinutes,
}

impl SyntheticKind {
    pub fn step_micros(self) -> i64 {
        match self {
            Self::Hourly => MICROS_PER_HOUR,
            Self::FifteenMinutes => MICROS_PER_HOUR / 4,
            Self::TenMinutes => MICROS_PER_HOUR / 6,
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

/// A smooth step from 0 to 1 centred on `at` (hours), `width` hours wide.
fn smooth_step(hour_of_day: f64, at: f64, width: f64) -> f64 {
    1.0 / (1.0 + (-(hour_of_day - at) / width).exp())
}

/// The plant's operating regimes.
pub const PLANT_REGIMES: usize = 3;
/// How many days the plant stays in a regime.
pub const PLANT_DAYS: std::ops::RangeInclusive<u32> = 4..=21;

/// Plant activity in regime `regime` at `hour_of_day` on a weekend day or not.
fn plant_activity(regime: u8, hour_of_day: f64, weekend: bool) -> f64 {
    match regime {
        // Normal operation: office hours, damped at weekends.
        0 => daily_profile(hour_of_day) * if weekend { 0.65 } else { 1.0 },
        // Two-shift production, every day: a plateau from 06:00 to 22:00.
        1 => {
            0.25 + 0.95
                * smooth_step(hour_of_day, 6.0, 0.6)
                * (1.0 - smooth_step(hour_of_day, 22.0, 0.6))
        }
        // Night operation on the off-peak tariff: low by day, a plateau from 22:00 to 06:00.
        _ => {
            let night =
                smooth_step(hour_of_day, 22.0, 0.6) + 1.0 - smooth_step(hour_of_day, 6.0, 0.6);
            0.1 + 0.75 * night
        }
    }
}

/// Hidden states behind a generated series, for tests and analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticLatent {
    /// The plant's operating regime per row, in `0..PLANT_REGIMES`.
    pub plant_regime: Vec<u8>,
    /// The weather regime's index per row (a new index at every change of weather).
    pub weather_regime: Vec<u32>,
    /// The outdoor temperature (°C) per row, also the last channel when there are two or more.
    pub temperature: Vec<f64>,
    /// Per load channel: the capacity its variable part saturates at.
    pub capacity: Vec<f64>,
    /// Per load channel: the share of rows whose variable part, uncapped, exceeds the capacity.
    pub saturated_share: Vec<f64>,
    /// Index of the temperature channel, when the series has one.
    pub temperature_channel: Option<usize>,
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
    /// Load per degree below the heating threshold and above the cooling threshold.
    heating: f64,
    cooling: f64,
    /// Hours the thermal response lags the outdoor temperature.
    thermal_lag_steps: usize,
    /// The variable part (activity, thermal, cross effect, noise) saturates softly here.
    capacity: f64,
}

/// Below this outdoor temperature buildings heat, above `COOLING_THRESHOLD` they cool.
const HEATING_THRESHOLD: f64 = 15.0;
const COOLING_THRESHOLD: f64 = 21.0;

/// `min(x, cap)` with a rounded knee of about `softness`.
fn soft_cap(x: f64, cap: f64, softness: f64) -> f64 {
    let over = (x - cap) / softness;
    // cap − softness·softplus((cap − x)/softness), stable for large |over|.
    let softplus = if over < -30.0 {
        0.0
    } else if over > 30.0 {
        over
    } else {
        over.exp().ln_1p()
    };
    x - softness * softplus
}

pub fn generate(spec: &SyntheticSpec) -> Result<SyntheticSeries, ForecastError> {
    generate_with_latent(spec).map(|(series, _)| series)
}

/// [`generate`], also returning the hidden states behind the series.
pub fn generate_with_latent(
    spec: &SyntheticSpec,
) -> Result<(SyntheticSeries, SyntheticLatent), ForecastError> {
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
    let uniform = |low: f64, high: f64, rng: &mut StdRng| {
        Uniform::new(low, high).expect("valid range").sample(rng)
    };
    let step_hours = spec.kind.step_micros() as f64 / MICROS_PER_HOUR as f64;
    let steps_per_hour = (1.0 / step_hours).round() as usize;
    let temperature_channel = (spec.channels >= 2).then_some(spec.channels - 1);
    let loads = temperature_channel.unwrap_or(spec.channels);

    let shapes: Vec<ChannelShape> = (0..loads)
        .map(|_| {
            let loading = uniform(0.6, 1.6, &mut rng);
            let own_daily_amplitude = uniform(0.2, 0.6, &mut rng);
            let heating = uniform(0.03, 0.09, &mut rng);
            let cooling = uniform(0.04, 0.12, &mut rng);
            ChannelShape {
                level: 5.0 + 3.0 * standard.sample(&mut rng),
                trend_per_year: 0.8 * standard.sample(&mut rng),
                loading,
                own_daily_amplitude,
                own_phase_hours: uniform(-3.0, 3.0, &mut rng),
                cross_effect: uniform(0.1, 0.3, &mut rng),
                lag_steps: rng.random_range(1..=6) * steps_per_hour,
                noise_scale: uniform(0.08, 0.2, &mut rng),
                heating,
                cooling,
                thermal_lag_steps: rng.random_range(1..=4) * steps_per_hour,
                // Peak activity at a high level plus a large thermal load: the highest peaks
                // (a production plateau in a heat wave or a cold spell) run into it.
                capacity: uniform(0.95, 1.15, &mut rng)
                    * (1.3 * loading + own_daily_amplitude + 10.0 * heating.max(cooling)),
            }
        })
        .collect();
    let annual_phase = uniform(0.0, std::f64::consts::TAU, &mut rng);
    let climate_mean = uniform(9.0, 14.0, &mut rng);
    let climate_swing = uniform(7.0, 11.0, &mut rng);

    // AR(1) coefficients are set per hour and compounded over the step, so both kinds have
    // the same persistence in time.
    let factor_persistence = 0.97_f64.powf(step_hours);
    let noise_persistence = 0.8_f64.powf(step_hours);
    let weather_relaxation = 1.0 - (-step_hours / 12.0).exp();
    let weather_noise_persistence = 0.9_f64.powf(step_hours);
    // A level shift every ~45 days per channel on average.
    let shift_probability = step_hours / (45.0 * 24.0);

    let (rows, channels) = (spec.rows, spec.channels);
    let mut latent = SyntheticLatent {
        plant_regime: Vec::with_capacity(rows),
        weather_regime: Vec::with_capacity(rows),
        temperature: Vec::with_capacity(rows),
        capacity: shapes.iter().map(|shape| shape.capacity).collect(),
        saturated_share: vec![0.0; loads],
        temperature_channel,
    };
    // Each load channel's structured signal (before level, trend, shifts and noise), which
    // the next channel's lagged cross-effect reads.
    let mut signal = vec![0.0_f64; rows * loads];
    let mut values = vec![0.0_f32; rows * channels];
    let mut missing = vec![false; rows * channels];
    let mut latent_disturbance = 0.0_f64;
    let mut noise_state = vec![0.0_f64; loads];
    let mut level_shift = vec![0.0_f64; loads];
    // Weather: the current regime's anomaly target and daily swing, hours left in it.
    let mut weather_index = 0_u32;
    let mut weather_target = 4.0 * standard.sample(&mut rng);
    let mut weather_swing = uniform(1.0, 7.0, &mut rng);
    let mut weather_hours_left = uniform(36.0, 200.0, &mut rng);
    let mut weather_anomaly = weather_target;
    let mut weather_noise = 0.0_f64;
    // Plant: regime and days left in it (changes at midnight).
    let mut plant_regime: u8 = rng.random_range(0..PLANT_REGIMES as u8);
    let mut plant_days_left: u32 = rng.random_range(PLANT_DAYS);
    let start_hours = spec.start_micros as f64 / MICROS_PER_HOUR as f64;
    for row in 0..rows {
        let hours = start_hours + row as f64 * step_hours;
        let hour_of_day = hours.rem_euclid(24.0);
        // 1970-01-01 was a Thursday; Monday = 0.
        let weekday = ((hours / 24.0).floor() as i64 + 3).rem_euclid(7);
        let weekend = weekday >= 5;
        let weekday_factor = if weekend { 0.65 } else { 1.0 };
        let annual = (std::f64::consts::TAU * hours / HOURS_PER_YEAR + annual_phase).sin();

        // Weather regimes: a new anomaly and sky every 1.5–8 days.
        weather_hours_left -= step_hours;
        if weather_hours_left <= 0.0 {
            weather_index += 1;
            weather_target = 4.0 * standard.sample(&mut rng);
            weather_swing = uniform(1.0, 7.0, &mut rng);
            weather_hours_left = uniform(36.0, 200.0, &mut rng);
        }
        weather_anomaly += weather_relaxation * (weather_target - weather_anomaly);
        weather_noise = weather_noise_persistence * weather_noise
            + (1.0 - weather_noise_persistence * weather_noise_persistence).sqrt()
                * 0.7
                * standard.sample(&mut rng);
        // Coldest around 05:00, warmest around 15:00.
        let diurnal =
            -(std::f64::consts::TAU * (hour_of_day - 3.0) / 24.0).cos() * 0.5 * weather_swing;
        let temperature =
            climate_mean + climate_swing * annual + weather_anomaly + diurnal + weather_noise;
        latent.temperature.push(temperature);
        latent.weather_regime.push(weather_index);

        // Plant regimes: 4–21 days each, switching at midnight to one of the others.
        if row > 0 && hour_of_day < step_hours * 0.5 {
            plant_days_left = plant_days_left.saturating_sub(1);
            if plant_days_left == 0 {
                plant_regime =
                    (plant_regime + rng.random_range(1..PLANT_REGIMES as u8)) % PLANT_REGIMES as u8;
                plant_days_left = rng.random_range(PLANT_DAYS);
            }
        }
        latent.plant_regime.push(plant_regime);

        latent_disturbance = factor_persistence * latent_disturbance
            + (1.0 - factor_persistence * factor_persistence).sqrt() * standard.sample(&mut rng);
        let activity = plant_activity(plant_regime, hour_of_day, weekend);
        // The slowly varying level that scales the daily amplitude (multiplicative season).
        let scale = (1.0 + 0.25 * annual + 0.15 * latent_disturbance).max(0.2);
        let years = row as f64 * step_hours / HOURS_PER_YEAR;
        for (channel, shape) in shapes.iter().enumerate() {
            let own_daily = shape.own_daily_amplitude
                * daily_profile(hour_of_day + shape.own_phase_hours)
                * weekday_factor;
            let cross = if channel > 0 && row >= shape.lag_steps {
                shape.cross_effect * signal[(row - shape.lag_steps) * loads + channel - 1]
            } else {
                0.0
            };
            let felt = latent.temperature[row.saturating_sub(shape.thermal_lag_steps)];
            let thermal = shape.heating * (HEATING_THRESHOLD - felt).max(0.0)
                + shape.cooling * (felt - COOLING_THRESHOLD).max(0.0);
            let structured = scale * (shape.loading * activity + own_daily) + thermal + cross;
            signal[row * loads + channel] = structured;
            if rng.random_bool(shift_probability) {
                level_shift[channel] += 0.8 * standard.sample(&mut rng);
            }
            let spread = shape.noise_scale * (0.4 + activity);
            noise_state[channel] =
                noise_persistence * noise_state[channel] + spread * standard.sample(&mut rng);
            let uncapped = structured + noise_state[channel];
            if uncapped > shape.capacity {
                latent.saturated_share[channel] += 1.0 / rows as f64;
            }
            let variable = soft_cap(uncapped, shape.capacity, 0.05 * shape.capacity);
            let value =
                shape.level + shape.trend_per_year * years + level_shift[channel] + variable;
            let cell = row * channels + channel;
            if spec.missing_fraction > 0.0 && rng.random_bool(spec.missing_fraction) {
                missing[cell] = true;
            } else {
                values[cell] = value as f32;
            }
        }
        if let Some(channel) = temperature_channel {
            let cell = row * channels + channel;
            if spec.missing_fraction > 0.0 && rng.random_bool(spec.missing_fraction) {
                missing[cell] = true;
            } else {
                values[cell] = temperature as f32;
            }
        }
    }
    let mut series = SyntheticSeries {
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
            calendar: None,
        },
    };
    let ts_micros: Vec<i64> = (0..rows).map(|row| series.timestamp_micros(row)).collect();
    series.matrix.calendar = Some(calendar_rows(&ts_micros, chrono_tz::UTC));
    Ok((series, latent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_cap_is_the_identity_below_and_the_capacity_above() {
        assert!((soft_cap(0.0, 2.0, 0.1) - 0.0).abs() < 1e-6);
        assert!((soft_cap(5.0, 2.0, 0.1) - 2.0).abs() < 1e-6);
        for x in [-3.0, 1.5, 1.95, 2.0, 2.05, 3.0, 100.0] {
            assert!(soft_cap(x, 2.0, 0.1) <= 2.0 && soft_cap(x, 2.0, 0.1) <= x);
        }
        // Rounded at the knee: at the capacity it gives up softness·ln 2.
        assert!((soft_cap(2.0, 2.0, 0.1) - (2.0 - 0.1 * 2f64.ln())).abs() < 1e-9);
    }
}
