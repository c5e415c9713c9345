//! The optimizer of a [`crate::Trainer`]: any of burn's [`Optimizer`]s
//! (Adam by default, AdamW selectable in [`crate::TrainerConfig`]), and
//! clipping of the gradients' global norm, as diffusion recipes commonly do
//! (to 1.0).

use std::path::Path;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, Optimizer};
use burn::record::Recorder as _;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, Recorder};

/// Which optimizer [`crate::Trainer::new`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam (Kingma and Ba 2015), as the reference.
    #[default]
    Adam,
    /// AdamW (Loshchilov and Hutter 2019): Adam with decoupled weight decay;
    /// each step multiplies every weight by `1 − lr · weight_decay`.
    AdamW {
        /// The decay factor (0.01 is common).
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// The optimizer, with `epsilon` in its denominator.
    pub(crate) fn build<B, M>(self, epsilon: f64) -> Box<dyn TrainerOptimizer<M, B>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + 'static,
    {
        match self {
            OptimizerKind::Adam => Box::new(AdamConfig::new().with_epsilon(epsilon as f32).init::<B, M>()),
            OptimizerKind::AdamW { weight_decay } => Box::new(
                AdamWConfig::new()
                    .with_epsilon(epsilon as f32)
                    .with_weight_decay(weight_decay as f32)
                    .init::<B, M>(),
            ),
        }
    }
}

/// What a trainer needs of an optimizer: a step, and its state saved into
/// and loaded from a checkpoint file. Every burn [`Optimizer`] is one.
pub trait TrainerOptimizer<M, B: AutodiffBackend>: Send {
    /// One step at learning rate `lr`; returns the updated module.
    fn step(&mut self, lr: f64, module: M, grads: GradientsParams) -> M;
    /// Writes the optimizer's state to `file` (burn's recorder format).
    fn save(&self, file: &Path) -> Result<(), CheckpointError>;
    /// Replaces the optimizer's state with the one in `file`.
    fn load(&mut self, file: &Path, device: &B::Device) -> Result<(), CheckpointError>;
}

impl<M, B, O> TrainerOptimizer<M, B> for O
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B> + 'static,
{
    fn step(&mut self, lr: f64, module: M, grads: GradientsParams) -> M {
        Optimizer::step(self, lr, module, grads)
    }

    fn save(&self, file: &Path) -> Result<(), CheckpointError> {
        checkpoint::save_record::<B, _>(self.to_record(), file, "optimizer state")
    }

    fn load(&mut self, file: &Path, device: &B::Device) -> Result<(), CheckpointError> {
        let mpk = file.with_extension("mpk");
        let record = checkpoint::decode_guarded(&mpk, "optimizer state", || {
            Recorder::new().load(file.to_path_buf(), device)
        })?
        .map_err(|e| CheckpointError::Load {
            path: mpk.clone(),
            what: "optimizer state",
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        })?;
        *self = self.clone().load_record(record);
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm (over every parameter of
/// `model`, as PyTorch's `clip_grad_norm_`) is at most `max_norm`; returns
/// the norm before clipping. burn's own clipping works per tensor instead.
pub fn clip_global_norm<B, M>(model: &M, grads: GradientsParams, max_norm: f64) -> (GradientsParams, f64)
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    struct SumSquares<'a, I: Backend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<I, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.sum = Some(match self.sum.take() {
                    Some(total) => total + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<I: Backend> {
        grads: GradientsParams,
        factor: f64,
        _backend: std::marker::PhantomData<I>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut squares = SumSquares::<B::InnerBackend> {
        grads: &grads,
        sum: None,
    };
    model.visit(&mut squares);
    let norm = squares.sum.map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt());
    if !(norm > max_norm) {
        // Within the bound, or not finite (the loss check reports that).
        return (grads, norm);
    }
    let mut scale = Scale::<B::InnerBackend> {
        grads,
        factor: max_norm / norm,
        _backend: Default::default(),
    };
    model.visit(&mut scale);
    (scale.grads, norm)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};

    use super::*;

    type B = Autodiff<Flex>;

    /// A 3→2 linear layer and the gradients of 3·Σw + 4·Σb: every weight's
    /// gradient is 3 (6 of them), every bias's 4 (2 of them), so the global
    /// norm is √(6·9 + 2·16) = √86.
    fn layer_and_grads() -> (Linear<B>, GradientsParams) {
        let device = Default::default();
        let layer = LinearConfig::new(3, 2).init::<B>(&device);
        let bias = layer.bias.as_ref().unwrap().val();
        let loss = layer.weight.val().mul_scalar(3.0).sum() + bias.mul_scalar(4.0).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        (layer, grads)
    }

    fn values(layer: &Linear<B>, grads: &GradientsParams) -> (Vec<f32>, Vec<f32>) {
        let w: Tensor<Flex, 2> = grads.get(layer.weight.id).unwrap();
        let b: Tensor<Flex, 1> = grads.get(layer.bias.as_ref().unwrap().id).unwrap();
        (
            w.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap(),
        )
    }

    #[test]
    fn the_global_norm_is_clipped_to_the_bound_keeping_the_direction() {
        let (layer, grads) = layer_and_grads();
        let (grads, norm) = clip_global_norm::<B, _>(&layer, grads, 1.0);
        assert!((norm - 86f64.sqrt()).abs() < 1e-5, "{norm}");
        let (w, b) = values(&layer, &grads);
        let scale = 1.0 / 86f64.sqrt();
        assert!(
            w.iter().all(|&g| (f64::from(g) - 3.0 * scale).abs() < 1e-6),
            "{w:?}"
        );
        assert!(
            b.iter().all(|&g| (f64::from(g) - 4.0 * scale).abs() < 1e-6),
            "{b:?}"
        );
        let after: f64 = w
            .iter()
            .chain(&b)
            .map(|&g| f64::from(g).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((after - 1.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn gradients_within_the_bound_are_left_alone() {
        let (layer, grads) = layer_and_grads();
        let (grads, norm) = clip_global_norm::<B, _>(&layer, grads, 10.0);
        assert!((norm - 86f64.sqrt()).abs() < 1e-5);
        let (w, b) = values(&layer, &grads);
        assert!(w.iter().all(|&g| g == 3.0) && b.iter().all(|&g| g == 4.0));
    }
}
