//! The residual xLSTM stack (`xLSTMBlockStack`, XLSTM.md §6): mLSTM and sLSTM blocks in the
//! configured order, then the optional final LayerNorm (`post_blocks_norm`). Input and output
//! `[B, S, E]`; no embedding or head (the forecaster adds those).
//!
//! Three ways to run the same weights:
//! * [`XlstmStack::forward`] / [`XlstmStack::forward_t`]: a whole sequence from the zero state
//!   (mLSTM with the configured kernel), for training and one-shot inference;
//! * [`XlstmStack::forward_with_state`]: a sequence continuing from a carried [`StackState`],
//!   returning the state after it (streaming inference after a forward over the history);
//! * [`XlstmStack::step`]: one token with the recurrent kernels, updating the state in place.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::XlstmConfig;
use super::layers::LayerNorm;
use super::mlstm_block::{MlstmBlock, MlstmBlockState};
use super::slstm_block::{SlstmBlock, SlstmBlockState};

#[derive(Debug, Clone)]
pub enum Block {
    Mlstm(MlstmBlock),
    Slstm(SlstmBlock),
}

/// The state one block carries between calls.
#[derive(Debug, Clone)]
pub enum BlockState {
    Mlstm(MlstmBlockState),
    Slstm(SlstmBlockState),
}

/// Carried recurrent state of the whole stack: per block its conv state and cell state.
#[derive(Debug, Clone)]
pub struct StackState {
    pub blocks: Vec<BlockState>,
    batch: usize,
}

impl StackState {
    /// The all-zero state (nothing seen yet) of a stack built from `cfg`.
    pub fn new(cfg: &XlstmConfig, batch: usize, device: &Device) -> Result<Self> {
        cfg.validate()?;
        use super::kernels::{mlstm::MlstmState, slstm::SlstmState};
        let zeros =
            |shape: (usize, usize, usize)| Tensor::zeros(shape, candle_core::DType::F32, device);
        let blocks = (0..cfg.num_blocks)
            .map(|idx| {
                Ok(if cfg.is_slstm(idx) {
                    let e = cfg.embedding_dim;
                    BlockState::Slstm(SlstmBlockState {
                        conv: match cfg.slstm.conv_kernel_size {
                            0 => None,
                            k => Some(zeros((batch, k, e))?),
                        },
                        cell: SlstmState::zeros(batch, e, device)?,
                    })
                } else {
                    let d = cfg.mlstm_inner_dim();
                    BlockState::Mlstm(MlstmBlockState {
                        conv: zeros((batch, cfg.mlstm.conv_kernel_size, d))?,
                        cell: MlstmState::zeros(
                            batch,
                            cfg.mlstm.num_heads,
                            cfg.mlstm_head_dim(),
                            device,
                        )?,
                    })
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks, batch })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
}

#[derive(Debug, Clone)]
pub struct XlstmStack {
    blocks: Vec<Block>,
    post_blocks_norm: Option<LayerNorm>,
    cfg: XlstmConfig,
}

impl XlstmStack {
    /// Builds the stack under `vb` with the official parameter names (`blocks.<i>.…`,
    /// `post_blocks_norm.weight`): a `VarMap` builder creates freshly initialised parameters,
    /// a tensor builder loads them.
    pub fn new(cfg: &XlstmConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let blocks = (0..cfg.num_blocks)
            .map(|idx| {
                let vb = vb.pp("blocks").pp(idx);
                Ok(if cfg.is_slstm(idx) {
                    Block::Slstm(SlstmBlock::new(cfg, idx, vb)?)
                } else {
                    Block::Mlstm(MlstmBlock::new(cfg, vb)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let post_blocks_norm = if cfg.add_post_blocks_norm {
            Some(LayerNorm::new(
                cfg.embedding_dim,
                vb.pp("post_blocks_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            blocks,
            post_blocks_norm,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &XlstmConfig {
        &self.cfg
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Inference over a whole sequence: `forward_t(x, false)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// `x` `[B, S, E]` → `[B, S, E]` from the zero state; `train` enables dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x, "forward")?;
        let mut x = x.clone();
        for block in &self.blocks {
            x = match block {
                Block::Mlstm(b) => b.forward_t(&x, train)?,
                Block::Slstm(b) => b.forward_t(&x, train)?,
            };
        }
        self.post_norm(x)
    }

    /// Continues from `state` over `x` `[B, S, E]`; returns the output and the state after the
    /// last token. The mLSTM blocks run the chunkwise kernel (it returns the final state).
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: &StackState,
    ) -> Result<(Tensor, StackState)> {
        self.check_input(x, "forward_with_state")?;
        self.check_state(state, x.dim(0)?)?;
        let mut x = x.clone();
        let mut next = Vec::with_capacity(self.blocks.len());
        for (block, block_state) in self.blocks.iter().zip(&state.blocks) {
            let (y, s) = match (block, block_state) {
                (Block::Mlstm(b), BlockState::Mlstm(s)) => {
                    let (y, s) = b.forward_with_state(&x, s)?;
                    (y, BlockState::Mlstm(s))
                }
                (Block::Slstm(b), BlockState::Slstm(s)) => {
                    let (y, s) = b.forward_with_state(&x, s)?;
                    (y, BlockState::Slstm(s))
                }
                _ => unreachable!("check_state matched the block kinds"),
            };
            x = y;
            next.push(s);
        }
        Ok((
            self.post_norm(x)?,
            StackState {
                blocks: next,
                batch: state.batch,
            },
        ))
    }

    /// One token `x_t` `[B, 1, E]` or `[B, E]` (the output has the same shape) with the
    /// recurrent kernels; `state` advances by one step.
    pub fn step(&self, x_t: &Tensor, state: &mut StackState) -> Result<Tensor> {
        let (x, squeezed) = match x_t.dims() {
            [_, e] if *e == self.cfg.embedding_dim => (x_t.unsqueeze(1)?, true),
            [_, 1, e] if *e == self.cfg.embedding_dim => (x_t.clone(), false),
            dims => candle_core::bail!(
                "xlstm stack step: x_t has shape {dims:?}, expected [B, 1, {e}] or [B, {e}]",
                e = self.cfg.embedding_dim
            ),
        };
        self.check_state(state, x.dim(0)?)?;
        let mut x = x;
        for (block, block_state) in self.blocks.iter().zip(state.blocks.iter_mut()) {
            x = match (block, &*block_state) {
                (Block::Mlstm(b), BlockState::Mlstm(s)) => {
                    let (y, s) = b.step(&x, s)?;
                    *block_state = BlockState::Mlstm(s);
                    y
                }
                (Block::Slstm(b), BlockState::Slstm(s)) => {
                    let (y, s) = b.forward_with_state(&x, s)?;
                    *block_state = BlockState::Slstm(s);
                    y
                }
                _ => unreachable!("check_state matched the block kinds"),
            };
        }
        let y = self.post_norm(x)?;
        if squeezed { y.squeeze(1) } else { Ok(y) }
    }

    fn post_norm(&self, x: Tensor) -> Result<Tensor> {
        match &self.post_blocks_norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        match x.dims() {
            [b, s, e] if *b > 0 && *s > 0 && *e == self.cfg.embedding_dim => Ok(()),
            dims => candle_core::bail!(
                "xlstm stack {what}: x has shape {dims:?}, expected [B, S, {}] with B, S > 0",
                self.cfg.embedding_dim
            ),
        }
    }

    fn check_state(&self, state: &StackState, batch: usize) -> Result<()> {
        if state.batch != batch {
            candle_core::bail!(
                "xlstm stack: state was made for batch {}, input has batch {batch}",
                state.batch
            );
        }
        let kinds_match = state.blocks.len() == self.blocks.len()
            && self.blocks.iter().zip(&state.blocks).all(|pair| {
                matches!(
                    pair,
                    (Block::Mlstm(_), BlockState::Mlstm(_))
                        | (Block::Slstm(_), BlockState::Slstm(_))
                )
            });
        if !kinds_match {
            candle_core::bail!(
                "xlstm stack: state does not fit this stack ({} block states for {} blocks, sLSTM at {:?})",
                state.blocks.len(),
                self.blocks.len(),
                self.cfg.slstm_at
            );
        }
        Ok(())
    }
}
