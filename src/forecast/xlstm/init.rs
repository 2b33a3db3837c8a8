//! Seeded parameter initialisation. candle's CPU random numbers cannot be seeded, so a
//! `VarMap` would give every run different initial weights; this backend draws each new
//! parameter from a generator seeded by the run's seed and the parameter's name, so a model is
//! identical for a seed whatever order its modules are built in.

use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

/// A `VarMap` whose fresh variables are drawn from seeded generators.
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// A builder over `varmap` (which holds the trainable variables afterwards).
    pub fn builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(Self {
            varmap: varmap.clone(),
            seed,
        });
        VarBuilder::from_backend(backend, DType::F32, device.clone())
    }

    fn generator(&self, name: &str) -> StdRng {
        // FNV-1a: stable across platforms and releases, unlike `DefaultHasher`.
        let mut hasher = Fnv1a::default();
        name.hash(&mut hasher);
        StdRng::seed_from_u64(self.seed ^ hasher.finish())
    }

    fn initial_values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let count = shape.elem_count();
        let mut rng = self.generator(name);
        let uniform = |rng: &mut StdRng, lo: f64, up: f64| -> Vec<f32> {
            (0..count)
                .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
                .collect()
        };
        let normal = |rng: &mut StdRng, mean: f64, stdev: f64| -> Vec<f32> {
            (0..count)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    (mean + stdev * z) as f32
                })
                .collect()
        };
        match init {
            Init::Const(value) => vec![value as f32; count],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = match fan {
                    FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                    FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
                };
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("var map lock poisoned");
        if let Some(existing) = vars.get(name) {
            let tensor = existing.as_tensor();
            if tensor.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, requested {shape:?}",
                    tensor.dims()
                );
            }
            return Ok(tensor.clone());
        }
        let values = self.initial_values(&shape, name, init);
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter {name}: a seeded var map needs the shape to create it")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("var map lock poisoned")
            .contains_key(name)
    }
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
