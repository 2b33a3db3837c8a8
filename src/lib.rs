//! xlstm-forecast: a self-hosted forecasting service built on residual xLSTM stacks.
//!
//! Layers (see ARCHITECTURE.md): `xlstm` (model library, no I/O) ← `forecast` ←
//! `jobs` ← `api`; `data` holds polars pipelines; `store` holds only queries.

pub mod api;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod forecast;
pub mod jobs;
pub mod store;
pub mod xlstm;
