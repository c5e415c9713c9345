//! Exponential moving average of a model's weights.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// EMA settings: ema ← d·ema + (1 − d)·weights after every optimizer step,
/// with d = min(decay, (1 + n)/(10 + n)) during warm-up (n = updates so
/// far), so that early, poor weights are forgotten quickly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// The decay d once warm-up is over (0.999 by default).
    pub decay: f64,
    /// Whether d is capped at (1 + n)/(10 + n) for the first updates.
    pub warmup: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.999,
            warmup: true,
        }
    }
}

impl EmaConfig {
    /// The decay of update number `n` (from 0).
    pub fn decay_at(&self, n: u64) -> f64 {
        if self.warmup {
            self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
        } else {
            self.decay
        }
    }
}

/// An averaged copy of a model (on a backend without autodiff).
#[derive(Debug, Clone)]
pub struct Ema<M> {
    /// The averaged model.
    pub model: M,
    /// The decay settings.
    pub config: EmaConfig,
    /// Updates made so far.
    pub updates: u64,
}

impl<M> Ema<M> {
    /// Starts the average at `model`'s current weights.
    pub fn new(model: M, config: EmaConfig) -> Self {
        Self {
            model,
            config,
            updates: 0,
        }
    }

    /// Folds `source` (same architecture) into the average.
    pub fn update<B: Backend>(&mut self, source: &M)
    where
        M: Module<B>,
    {
        let decay = self.config.decay_at(self.updates);
        // Moved out, not cloned (a clone would share every buffer, and a
        // kernel that blends in place would have to copy it); the source's
        // weights stand in until the blend is back.
        let model = std::mem::replace(&mut self.model, source.clone());
        self.model = blend(model, source, decay);
        self.updates += 1;
    }
}

/// target ← decay·target + (1 − decay)·source, parameter by parameter
/// (through the installed [`crate::kernels::blend`]), matched in visit
/// order (the two modules have the same type, so the same order whatever
/// their parameter ids).
pub fn blend<B: Backend, M: Module<B>>(target: M, source: &M, decay: f64) -> M {
    let mut collect = Collect::<B> { tensors: Vec::new() };
    source.visit(&mut collect);
    let mut mapper = Blend {
        source: collect.tensors.into_iter(),
        decay,
    };
    target.map(&mut mapper)
}

struct Collect<B: Backend> {
    tensors: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.tensors.push(param.val().reshape([-1]));
    }
}

struct Blend<B: Backend> {
    source: std::vec::IntoIter<Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let source = self
            .source
            .next()
            .expect("EMA source has the same parameters as the average");
        let dims = value.dims();
        let blended = crate::kernels::blend(value.reshape([-1]), source, self.decay).reshape(dims);
        Param::from_mapped_value(id, blended, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type TestBackend = burn::backend::Flex;
    use burn::nn::{Linear, LinearConfig};

    fn weights(l: &Linear<TestBackend>) -> Vec<f32> {
        l.weight.val().into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn blend_is_the_weighted_average() {
        let device = Default::default();
        let a = LinearConfig::new(3, 2).init::<TestBackend>(&device);
        let b = LinearConfig::new(3, 2).init::<TestBackend>(&device);
        let (wa, wb) = (weights(&a), weights(&b));
        let c = blend(a, &b, 0.75);
        for ((x, y), z) in wa.iter().zip(&wb).zip(weights(&c)) {
            assert!((0.75 * x + 0.25 * y - z).abs() < 1e-6);
        }
    }

    #[test]
    fn warmup_decay() {
        let c = EmaConfig {
            decay: 0.999,
            warmup: true,
        };
        assert!((c.decay_at(0) - 0.1).abs() < 1e-12);
        assert!((c.decay_at(90) - 91.0 / 100.0).abs() < 1e-12);
        assert_eq!(c.decay_at(1_000_000), 0.999);
        assert_eq!(
            EmaConfig {
                decay: 0.9,
                warmup: false
            }
            .decay_at(0),
            0.9
        );
    }
}
