//! The vector instructions the fused CPU kernels may use: the widest this CPU has, capped by
//! the environment variable `XLSTM_CPU_SIMD` (`avx512`, `avx2` or `none`). Every kernel asks
//! here, never the CPU directly, so one setting governs them all. Capping is for operators
//! whose CPUs clock down under AVX-512, for the same float rounding as a machine with less
//! (each instruction set sums in its own order), and for measuring a narrower path on a
//! wider CPU.

use std::sync::OnceLock;

/// The environment variable that caps the instruction set.
pub const ENV_CPU_SIMD: &str = "XLSTM_CPU_SIMD";

/// Instruction sets, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Plain Rust loops (what the compiler vectorises for the baseline target).
    None,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::None => "none",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(SimdLevel::None),
            "avx2" => Ok(SimdLevel::Avx2),
            "avx512" => Ok(SimdLevel::Avx512),
            _ => Err(format!(
                "{ENV_CPU_SIMD}: expected avx512, avx2 or none, got {value:?}"
            )),
        }
    }
}

/// The widest set this CPU supports.
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2 && is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::None
}

/// The cap `XLSTM_CPU_SIMD` sets (None when unset or empty), or the error that names it.
/// Commands check this first, so a misspelt value stops them instead of being ignored.
pub fn configured_cap() -> Result<Option<SimdLevel>, String> {
    match std::env::var(ENV_CPU_SIMD) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => SimdLevel::parse(&value).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("{ENV_CPU_SIMD}: the value is not UTF-8"))
        }
    }
}

/// The set the kernels use: the detected one, capped. Read once per process. An invalid cap
/// (which commands refuse at start) leaves the detected set.
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected();
        match configured_cap() {
            Ok(Some(cap)) => detected.min(cap),
            Ok(None) | Err(_) => detected,
        }
    })
}

/// Whether the kernels may use AVX2 and FMA.
pub fn avx2_fma() -> bool {
    level() >= SimdLevel::Avx2
}

/// Whether the kernels may use AVX-512F (implies [`avx2_fma`]).
pub fn avx512() -> bool {
    level() >= SimdLevel::Avx512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_by_name_and_anything_else_is_refused_by_name() {
        assert_eq!(SimdLevel::parse("avx2"), Ok(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse(" AVX512 "), Ok(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("none"), Ok(SimdLevel::None));
        let err = SimdLevel::parse("sse4").unwrap_err();
        assert!(err.contains(ENV_CPU_SIMD) && err.contains("sse4"), "{err}");
    }

    #[test]
    fn the_level_in_use_never_exceeds_what_the_cpu_has() {
        assert!(level() <= detected());
        assert_eq!(avx512(), level() == SimdLevel::Avx512);
        assert!(!avx512() || avx2_fma());
    }
}
