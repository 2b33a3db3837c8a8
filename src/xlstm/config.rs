//! Configuration of the residual xLSTM stack (XLSTM.md §4–6): which blocks are sLSTM, head
//! counts, up-projection factors, conv kernel sizes, initialisation choices and the mLSTM
//! kernel used for whole-sequence forward passes.
//!
//! Defaults are the official `xLSTMBlockStackConfig` / `mLSTMLayerConfig` / `sLSTMLayerConfig`
//! defaults, so a config that only names `embedding_dim`, `num_blocks` and `slstm_at` builds
//! the same architecture as the official code.

use serde::{Deserialize, Serialize};

/// Up-projection sizes are rounded up to a multiple of this (XLSTM.md §0.6).
pub const PROJ_ROUND_TO: usize = 64;

/// Which mLSTM kernel runs whole-sequence forward passes (training and history forward).
/// The recurrent `step` always uses the recurrent kernel; `forward_with_state` always uses the
/// chunkwise kernel because only it returns the final cell state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "form")]
pub enum MlstmKernel {
    /// The quadratic stabilised parallel form (what the official stack trains with).
    Parallel,
    /// The chunkwise form: linear in the sequence length; `chunk_size` tokens per chunk.
    Chunkwise { chunk_size: usize },
}

impl Default for MlstmKernel {
    fn default() -> Self {
        MlstmKernel::Chunkwise {
            chunk_size: crate::xlstm::kernels::mlstm::DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Initial values of the sLSTM gate biases (official `bias_init`, XLSTM.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlstmBiasInit {
    /// Forget bias `5 − 12·(j/(DH−1))^(0.3 + 1.3·block_idx/(num_blocks−1))`, other gates 0.
    #[default]
    PowerlawBlockdependent,
    /// Forget bias `linspace(3, 6, DH)` in every head, other gates 0.
    SmallInit,
    /// Every bias uniform in ±1/√H.
    Standard,
    /// All biases 0.
    Zeros,
}

/// Initial values of the sLSTM recurrent weights (official `recurrent_weight_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlstmRecurrentInit {
    /// All zero: the cell starts as a gated feed-forward map (official default).
    #[default]
    Zeros,
    /// Uniform in ±1/√H.
    Standard,
}

/// The mLSTM block (pre up-projection, XLSTM.md §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlstmBlockConfig {
    pub num_heads: usize,
    /// Inner dim = 64·⌈proj_factor·E/64⌉.
    pub proj_factor: f64,
    pub conv_kernel_size: usize,
    /// Block size of the block-diagonal q/k/v projections.
    pub qkv_proj_blocksize: usize,
    pub kernel: MlstmKernel,
}

impl Default for MlstmBlockConfig {
    fn default() -> Self {
        Self {
            num_heads: 4,
            proj_factor: 2.0,
            conv_kernel_size: 4,
            qkv_proj_blocksize: 4,
            kernel: MlstmKernel::default(),
        }
    }
}

/// The sLSTM block (post up-projection: cell, then gated FFN, XLSTM.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlstmBlockConfig {
    pub num_heads: usize,
    /// 0 disables the conv branch (the i and f gates then read the normed input).
    pub conv_kernel_size: usize,
    /// FFN dim = 64·⌈ffn_proj_factor·E/64⌉.
    pub ffn_proj_factor: f64,
    pub bias_init: SlstmBiasInit,
    pub recurrent_init: SlstmRecurrentInit,
}

impl Default for SlstmBlockConfig {
    fn default() -> Self {
        Self {
            num_heads: 4,
            conv_kernel_size: 4,
            ffn_proj_factor: 1.3,
            bias_init: SlstmBiasInit::default(),
            recurrent_init: SlstmRecurrentInit::default(),
        }
    }
}

/// The residual stack `xLSTMBlockStack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XlstmConfig {
    pub embedding_dim: usize,
    pub num_blocks: usize,
    /// 0-based indices of the sLSTM blocks; every other block is an mLSTM block.
    pub slstm_at: Vec<usize>,
    pub mlstm: MlstmBlockConfig,
    pub slstm: SlstmBlockConfig,
    /// Dropout probability after each block's output projection (and the FFN), training only.
    pub dropout: f64,
    /// Final LayerNorm after the last block.
    pub add_post_blocks_norm: bool,
}

impl Default for XlstmConfig {
    /// The forecasting default: E = 64, 4 blocks, xLSTM[3:1] with the sLSTM at block 1.
    fn default() -> Self {
        Self {
            embedding_dim: 64,
            num_blocks: 4,
            slstm_at: vec![1],
            mlstm: MlstmBlockConfig::default(),
            slstm: SlstmBlockConfig::default(),
            dropout: 0.0,
            add_post_blocks_norm: true,
        }
    }
}

/// A configuration the stack cannot be built from; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("xlstm config: {0}")]
pub struct ConfigError(pub String);

impl From<ConfigError> for candle_core::Error {
    fn from(e: ConfigError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// `64·⌈factor·dim/64⌉` (XLSTM.md §0.6).
pub fn round_up_projection(factor: f64, dim: usize) -> usize {
    let raw = (factor * dim as f64).ceil() as usize;
    raw.div_ceil(PROJ_ROUND_TO) * PROJ_ROUND_TO
}

/// sLSTM block positions for an xLSTM[a:b] stack (a mLSTM : b sLSTM blocks) of `num_blocks`.
///
/// `round(num_blocks·b/(a+b))` sLSTM blocks, spread evenly: the stack is cut into that many
/// equal groups and each group's sLSTM block sits at its second position (its first when the
/// group has one block). 4 blocks at [3:1] gives `[1]`, the official choice; 7 blocks at [7:1]
/// gives `[1]` like the official README example; [1:1] on 4 blocks gives `[1, 3]`.
pub fn slstm_at_for_ratio(
    num_blocks: usize,
    mlstm_parts: usize,
    slstm_parts: usize,
) -> Result<Vec<usize>, ConfigError> {
    if mlstm_parts + slstm_parts == 0 {
        return Err(ConfigError(
            "ratio xLSTM[0:0] has no blocks; at least one side must be positive".into(),
        ));
    }
    let share = slstm_parts as f64 / (mlstm_parts + slstm_parts) as f64;
    let num_slstm = ((num_blocks as f64 * share).round() as usize).min(num_blocks);
    let num_slstm = if slstm_parts > 0 { num_slstm.max(1) } else { 0 };
    let num_slstm = if mlstm_parts > 0 && num_blocks > 1 {
        num_slstm.min(num_blocks - 1)
    } else {
        num_slstm
    };
    let group = num_blocks as f64 / num_slstm.max(1) as f64;
    let offset = usize::from(group >= 2.0);
    Ok((0..num_slstm)
        .map(|i| (i as f64 * group).floor() as usize + offset)
        .collect())
}

impl XlstmConfig {
    /// An xLSTM[a:b] stack with every other setting at its default.
    pub fn with_ratio(
        embedding_dim: usize,
        num_blocks: usize,
        mlstm_parts: usize,
        slstm_parts: usize,
    ) -> Result<Self, ConfigError> {
        let cfg = Self {
            embedding_dim,
            num_blocks,
            slstm_at: slstm_at_for_ratio(num_blocks, mlstm_parts, slstm_parts)?,
            ..Self::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn is_slstm(&self, block_idx: usize) -> bool {
        self.slstm_at.contains(&block_idx)
    }

    pub fn num_slstm_blocks(&self) -> usize {
        self.slstm_at.len()
    }

    /// The paper's name of this mix: `mLSTM-only`, `sLSTM-only` or `xLSTM[a:b]`.
    pub fn variant_name(&self) -> String {
        let slstm = self.num_slstm_blocks();
        let mlstm = self.num_blocks - slstm;
        match (mlstm, slstm) {
            (_, 0) => "mLSTM-only".to_string(),
            (0, _) => "sLSTM-only".to_string(),
            (m, s) => {
                let g = gcd(m, s);
                format!("xLSTM[{}:{}]", m / g, s / g)
            }
        }
    }

    /// mLSTM inner dim D = 64·⌈proj_factor·E/64⌉.
    pub fn mlstm_inner_dim(&self) -> usize {
        round_up_projection(self.mlstm.proj_factor, self.embedding_dim)
    }

    pub fn mlstm_head_dim(&self) -> usize {
        self.mlstm_inner_dim() / self.mlstm.num_heads
    }

    pub fn slstm_head_dim(&self) -> usize {
        self.embedding_dim / self.slstm.num_heads
    }

    /// Gated FFN dim of the sLSTM blocks, 64·⌈ffn_proj_factor·E/64⌉.
    pub fn ffn_dim(&self) -> usize {
        round_up_projection(self.slstm.ffn_proj_factor, self.embedding_dim)
    }

    /// Checks every field; the error names the field and the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |msg: String| Err(ConfigError(msg));
        if self.embedding_dim == 0 {
            return err("embedding_dim must be positive".into());
        }
        if self.num_blocks == 0 {
            return err("num_blocks must be positive".into());
        }
        for (pos, &idx) in self.slstm_at.iter().enumerate() {
            if idx >= self.num_blocks {
                return err(format!(
                    "slstm_at[{pos}] = {idx} is out of range for num_blocks = {} (indices are 0-based)",
                    self.num_blocks
                ));
            }
            if self.slstm_at[..pos].contains(&idx) {
                return err(format!("slstm_at lists block {idx} twice"));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        let has_mlstm = self.num_slstm_blocks() < self.num_blocks;
        if has_mlstm {
            let m = &self.mlstm;
            if !(m.proj_factor.is_finite() && m.proj_factor > 0.0) {
                return err(format!(
                    "mlstm.proj_factor = {} must be positive",
                    m.proj_factor
                ));
            }
            let inner = self.mlstm_inner_dim();
            if m.num_heads == 0 || !inner.is_multiple_of(m.num_heads) {
                return err(format!(
                    "mlstm.num_heads = {} must be positive and divide the mLSTM inner dim {inner} \
                     (64·⌈proj_factor·embedding_dim/64⌉)",
                    m.num_heads
                ));
            }
            if m.qkv_proj_blocksize == 0 || !inner.is_multiple_of(m.qkv_proj_blocksize) {
                return err(format!(
                    "mlstm.qkv_proj_blocksize = {} must be positive and divide the mLSTM inner dim {inner}",
                    m.qkv_proj_blocksize
                ));
            }
            if m.conv_kernel_size == 0 {
                return err(
                    "mlstm.conv_kernel_size must be positive (the mLSTM block always has its conv)"
                        .into(),
                );
            }
            if let MlstmKernel::Chunkwise { chunk_size: 0 } = m.kernel {
                return err("mlstm.kernel.chunk_size must be positive".into());
            }
        }
        if self.num_slstm_blocks() > 0 {
            let s = &self.slstm;
            if s.num_heads == 0 || !self.embedding_dim.is_multiple_of(s.num_heads) {
                return err(format!(
                    "slstm.num_heads = {} must be positive and divide embedding_dim = {}",
                    s.num_heads, self.embedding_dim
                ));
            }
            if s.bias_init == SlstmBiasInit::PowerlawBlockdependent && self.slstm_head_dim() < 2 {
                return err(format!(
                    "slstm.bias_init = powerlaw_blockdependent needs a head dim of at least 2, \
                     got embedding_dim / slstm.num_heads = {}",
                    self.slstm_head_dim()
                ));
            }
            if !(s.ffn_proj_factor.is_finite() && s.ffn_proj_factor > 0.0) {
                return err(format!(
                    "slstm.ffn_proj_factor = {} must be positive",
                    s.ffn_proj_factor
                ));
            }
        }
        Ok(())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_sizes_round_up_to_64() {
        assert_eq!(round_up_projection(2.0, 64), 128);
        assert_eq!(round_up_projection(2.0, 16), 64);
        assert_eq!(round_up_projection(1.3, 64), 128);
        assert_eq!(round_up_projection(1.3, 16), 64);
        assert_eq!(round_up_projection(1.3, 128), 192);
    }

    #[test]
    fn ratio_presets_place_slstm_blocks() {
        assert_eq!(slstm_at_for_ratio(4, 3, 1).unwrap(), vec![1]);
        assert_eq!(slstm_at_for_ratio(7, 7, 1).unwrap(), vec![1]);
        assert_eq!(slstm_at_for_ratio(4, 1, 1).unwrap(), vec![1, 3]);
        assert_eq!(slstm_at_for_ratio(4, 1, 0).unwrap(), Vec::<usize>::new());
        assert_eq!(slstm_at_for_ratio(4, 0, 1).unwrap(), vec![0, 1, 2, 3]);
        assert!(slstm_at_for_ratio(4, 0, 0).is_err());
    }

    #[test]
    fn variant_names() {
        let mut cfg = XlstmConfig::default();
        assert_eq!(cfg.variant_name(), "xLSTM[3:1]");
        cfg.slstm_at = vec![];
        assert_eq!(cfg.variant_name(), "mLSTM-only");
        cfg.slstm_at = vec![0, 1, 2, 3];
        assert_eq!(cfg.variant_name(), "sLSTM-only");
    }
}
