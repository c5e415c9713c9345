//! The optimizer of a [`crate::Trainer`]: any of burn's [`Optimizer`]s
//! (Adam by default, as [`FusedAdam`]; AdamW selectable in
//! [`crate::TrainerConfig`]), and clipping of the gradients' global norm,
//! as diffusion recipes commonly do (to 1.0).

use std::path::Path;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamState, AdamWConfig, AdaptiveMomentumState, GradientsParams, LearningRate, Optimizer, SimpleOptimizer,
};
use burn::record::Recorder as _;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Device, ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, Recorder};
use crate::kernels::{self, AdamStep};

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
            OptimizerKind::Adam => Box::new(OptimizerAdaptor::<FusedAdam, M, B>::from(FusedAdam::new(
                epsilon as f32,
            ))),
            OptimizerKind::AdamW { weight_decay } => Box::new(
                AdamWConfig::new()
                    .with_epsilon(epsilon as f32)
                    .with_weight_decay(weight_decay as f32)
                    .init::<B, M>(),
            ),
        }
    }
}

/// burn's Adam (no weight decay, no AMSGrad) with each parameter's update
/// done by the installed [`kernels::adam_step`] (one pass per parameter
/// where a kernel is installed; burn's own operations otherwise).
///
/// Same arithmetic as `burn::optim::AdamConfig::new().init()` (the same
/// bits, tested), and the same state type, `AdamState`, so its checkpoints
/// are burn's Adam's: either optimizer loads the other's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdam {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// ε in the denominator.
    pub epsilon: f32,
}

impl FusedAdam {
    /// burn's defaults (β₁ 0.9, β₂ 0.999) with ε `epsilon`.
    pub fn new(epsilon: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon,
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdam {
    type State<const D: usize> = AdamState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let shape = tensor.shape();
        let (moments, time) = match state {
            Some(AdamState { momentum }) => (
                Some((momentum.moment_1.reshape([-1]), momentum.moment_2.reshape([-1]))),
                momentum.time + 1,
            ),
            None => (None, 1),
        };
        let step = AdamStep {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            lr,
            time,
        };
        let (param, m, v) = kernels::adam_step(tensor.reshape([-1]), grad.reshape([-1]), moments, &step);
        let momentum = AdaptiveMomentumState::new(time, m.reshape(shape.clone()), v.reshape(shape.clone()));
        (param.reshape(shape), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
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
    if norm.partial_cmp(&max_norm) != Some(std::cmp::Ordering::Greater) {
        // Within the bound, or NaN (the loss check reports that).
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

    /// The layer's weights and bias, flattened.
    fn weights(layer: &Linear<B>) -> Vec<f32> {
        let mut w = layer.weight.val().into_data().to_vec::<f32>().unwrap();
        w.extend(
            layer
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        );
        w
    }

    /// Gradients of Σ(layer(x)²) for a batch that changes with `step`
    /// (so the moments see different gradients each step).
    fn squares_grads(layer: &Linear<B>, step: usize) -> GradientsParams {
        let device = Default::default();
        let x: Vec<f32> = (0..12)
            .map(|i| ((i * 7 + step * 5) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let x = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(x, [4, 3]), &device);
        let loss = layer.forward(x).powi_scalar(2).sum();
        GradientsParams::from_grads(loss.backward(), layer)
    }

    /// A 3→4 layer with fixed small weights (−0.009 to 0.009): the steps
    /// below (0.05 to 0.12) are larger than the weights, so a rounding
    /// difference in the update shows in the new weight.
    fn fixed_layer() -> Linear<B> {
        let device = Default::default();
        let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.0015 - 0.009).collect();
        let weight = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(w, [3, 4]), &device);
        Linear {
            weight: Param::from_tensor(weight),
            bias: Some(Param::from_tensor(Tensor::from_floats(
                [0.001, -0.002, 0.003, -0.004],
                &device,
            ))),
        }
    }

    /// Five steps of [`FusedAdam`] (through the generic kernel) and of
    /// burn's Adam from the same weights and gradients give the same bits,
    /// at ε 1e-8 (the reference's) and a learning rate that changes
    /// (computing m/(√v + e) before multiplying by the bias correction, one
    /// rounding moved, fails it); and
    /// each loads the other's saved state and steps on to the same bits
    /// (a state that did not load would restart the moments: other bits).
    #[test]
    fn fused_adam_is_burns_adam_bit_for_bit() {
        use burn::optim::AdamConfig;
        use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder as _};
        let epsilon = 1e-8;
        let mut ours = OptimizerAdaptor::<FusedAdam, Linear<B>, B>::from(FusedAdam::new(epsilon));
        let mut burns = AdamConfig::new().with_epsilon(epsilon).init::<B, Linear<B>>();
        // Clones: the same parameter ids, so each optimizer's state fits the other's layer.
        let start = fixed_layer();
        let (mut a, mut b) = (start.clone(), start.clone());
        for step in 0..5 {
            let lr = 0.05 * (1.0 + step as f64 / 3.0);
            let (ga, gb) = (squares_grads(&a, step), squares_grads(&b, step));
            a = Optimizer::step(&mut ours, lr, a, ga);
            b = Optimizer::step(&mut burns, lr, b, gb);
            assert_eq!(weights(&a), weights(&b), "step {step}");
        }
        assert_ne!(weights(&a), weights(&start), "the steps moved the weights");
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let device = Default::default();
        let (ours_bytes, burns_bytes) = (
            recorder.record(ours.to_record(), ()).unwrap(),
            recorder.record(burns.to_record(), ()).unwrap(),
        );
        let mut ours = OptimizerAdaptor::<FusedAdam, Linear<B>, B>::from(FusedAdam::new(epsilon))
            .load_record(recorder.load(burns_bytes, &device).unwrap());
        let mut burns = AdamConfig::new()
            .with_epsilon(epsilon)
            .init::<B, Linear<B>>()
            .load_record(recorder.load(ours_bytes, &device).unwrap());
        let (ga, gb) = (squares_grads(&a, 5), squares_grads(&b, 5));
        let a = Optimizer::step(&mut ours, 0.05, a, ga);
        let b = Optimizer::step(&mut burns, 0.05, b, gb);
        assert_eq!(weights(&a), weights(&b), "after swapping the states");
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
