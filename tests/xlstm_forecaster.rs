//! The xLSTM forecaster: network shapes and masking, quantile order, seeded determinism,
//! artefact round trips and refusals, fine-tuning, divergence and cancellation, and the
//! `train` / `forecast` / `eval --model xlstm` commands.

mod xlstm_forecaster {
    mod artefacts;
    mod calendar;
    mod cli;
    mod common;
    mod training;
}
