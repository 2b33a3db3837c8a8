//! Which device models train and run on: `auto`, `cpu`, `cuda` or `cuda:N`, as the CLI's
//! `--device` and the service's `compute.device` setting spell it.

use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device as asked for, before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA support and a device is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceChoice {
    /// Opens the device; `auto` logs what it picked and why.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
            Self::Auto => {
                if !cfg!(feature = "cuda") {
                    tracing::info!("device auto: CPU (this build has no CUDA support)");
                    return Ok(Device::Cpu);
                }
                match open_cuda(0) {
                    Ok(device) => {
                        tracing::info!("device auto: CUDA device 0");
                        Ok(device)
                    }
                    Err(err) => {
                        // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
                        let reason = format!("{err:#}");
                        let reason = reason.lines().next().unwrap_or_default();
                        tracing::info!("device auto: CPU ({reason})");
                        Ok(Device::Cpu)
                    }
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("cuda:{ordinal}: no usable CUDA device"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    Err(anyhow::anyhow!(
        "cuda:{ordinal}: this build has no CUDA support; build with `--features cuda` \
         (README.md, \"GPU\")"
    ))
    .context("cannot open the device")
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("'{text}' is not a device (expected auto, cpu, cuda or cuda:N)")
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_spelling() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
            assert_eq!(choice.to_string(), text);
        }
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
        }
    }

    #[test]
    fn auto_and_cpu_open_without_cuda() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
            let err = format!("{:#}", DeviceChoice::Cuda(0).open().unwrap_err());
            assert!(err.contains("this build has no CUDA support"), "{err}");
        }
    }
}
