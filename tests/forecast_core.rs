//! The forecasting foundations: split protocol and windows, metrics on hand examples,
//! baselines on constructed series, the eval protocol and the synthetic generator.

mod forecast_core {
    mod baselines;
    mod common;
    mod metrics;
    mod synthetic;
    mod windows;
}
