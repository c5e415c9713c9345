//! Replaceable kernels of a training step: Adam's update of one parameter
//! and the EMA's blend of one parameter, which a binary may swap, per
//! backend, for a faster implementation of the same arithmetic.
//!
//! burn's Adam updates a parameter in about a dozen elementwise passes
//! (two moments, their bias corrections, a square root, a division, the
//! step), each reading and writing whole tensors; the EMA takes three more.
//! On a GPU that is cheap; on a CPU backend whose elementwise operations
//! run on the calling thread, it is 4 to 5% of a batch-32 training step
//! while the other cores wait. A kernel can do each parameter in one
//! parallel pass, in place. This crate stays generic over the backend: the
//! binary that knows its backend installs [`TrainKernels`] for it once (as
//! `diffusion_model::kernels` does for the U-Net's operations). An
//! installed kernel must give the same bits as the generic one (each
//! element goes through the same f32 operations in the same order), so a
//! run resumes and reproduces the same whatever is installed.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::prelude::*;
//! use diffusion_train::kernels::{self, TrainKernels};
//!
//! fn my_blend(target: Tensor<Flex, 1>, source: Tensor<Flex, 1>, decay: f64) -> Tensor<Flex, 1> {
//!     kernels::generic_blend(target, source, decay) // a faster kernel would go here
//! }
//! kernels::install::<Flex>(TrainKernels { blend: my_blend, ..TrainKernels::default() });
//! ```

use burn::prelude::*;
use diffusion_model::kernels::Registry;

/// The scalars of one Adam step of one parameter (burn's `AdamConfig`
/// without weight decay or AMSGrad).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Decay of the first moment (0.9).
    pub beta_1: f32,
    /// Decay of the second moment (0.999).
    pub beta_2: f32,
    /// ε in the denominator.
    pub epsilon: f32,
    /// The learning rate.
    pub lr: f64,
    /// This step's number for this parameter, from 1 (the bias corrections'
    /// exponent).
    pub time: usize,
}

impl AdamStep {
    /// The factors burn's Adam computes for step `time`, in f32 as it does:
    /// `(√(1 − β₂ᵗ) / (1 − β₁ᵗ), ε·√(1 − β₂ᵗ))`, so that the update is
    /// `m·first / (√v + second)`.
    pub fn factors(&self) -> (f32, f32) {
        let time = self.time as i32;
        let bias_correction2_sqrt = (1.0 - self.beta_2.powi(time)).sqrt();
        let combined = bias_correction2_sqrt / (1.0 - self.beta_1.powi(time));
        (combined, self.epsilon * bias_correction2_sqrt)
    }
}

/// One Adam step of one parameter, flattened: `(param, grad, moments,
/// step)` → `(param, first moment, second moment)`; `moments` is `None` on
/// the parameter's first step (both moments start from the gradient
/// alone, as in burn).
///
/// Per element, in f32 and in this order (burn's Adam):
/// m ← m·β₁ + g·(1 − β₁), v ← v·β₂ + (g·g)·(1 − β₂) (or g·(1 − β₁) and
/// (g·g)·(1 − β₂) on the first step), then
/// p ← p − ((m·c) / (√v + e))·lr with `(c, e)` = [`AdamStep::factors`].
///
/// # Shapes
/// - every tensor: `[n]`
pub type AdamStepFn<B> =
    fn(Tensor<B, 1>, Tensor<B, 1>, Option<(Tensor<B, 1>, Tensor<B, 1>)>, &AdamStep) -> AdamOutput<B>;

/// What an [`AdamStepFn`] returns: the parameter, the first moment, the
/// second moment.
pub type AdamOutput<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// The EMA's blend of one parameter, flattened: `target·d + source·(1 − d)`
/// per element, with d and 1 − d (computed in f64) rounded to f32.
///
/// # Shapes
/// - `target`, `source`: `[n]`; returns `[n]`
pub type BlendFn<B> = fn(Tensor<B, 1>, Tensor<B, 1>, f64) -> Tensor<B, 1>;

/// The replaceable kernels of one backend type (the backend the optimizer
/// and the EMA run on: the inner backend of an autodiff one).
pub struct TrainKernels<B: Backend> {
    /// Adam's update of one parameter.
    pub adam_step: AdamStepFn<B>,
    /// The EMA's blend of one parameter.
    pub blend: BlendFn<B>,
}

impl<B: Backend> Clone for TrainKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for TrainKernels<B> {}

impl<B: Backend> Default for TrainKernels<B> {
    fn default() -> Self {
        TrainKernels {
            adam_step: generic_adam_step::<B>,
            blend: generic_blend::<B>,
        }
    }
}

/// The installed `TrainKernels<B>`, one per backend type.
static INSTALLED: Registry = Registry::new();

/// Makes `kernels` the ones used for backend `B` from now on (replacing
/// any earlier installation for `B`).
pub fn install<B: Backend>(kernels: TrainKernels<B>) {
    INSTALLED.set(kernels);
}

/// The kernels in use for backend `B`.
pub fn get<B: Backend>() -> TrainKernels<B> {
    INSTALLED.get().unwrap_or_default()
}

/// One Adam step through the installed kernel for `B`.
pub fn adam_step<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    step: &AdamStep,
) -> AdamOutput<B> {
    (get::<B>().adam_step)(param, grad, moments, step)
}

/// burn's Adam step (its `AdaptiveMomentum::transform` and `Adam::step`,
/// the same tensor operations in the same order).
pub fn generic_adam_step<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    step: &AdamStep,
) -> AdamOutput<B> {
    let (c1, c2) = (1.0 - step.beta_1, 1.0 - step.beta_2);
    let (m, v) = match moments {
        Some((m, v)) => (
            m.mul_scalar(step.beta_1).add(grad.clone().mul_scalar(c1)),
            v.mul_scalar(step.beta_2).add(grad.square().mul_scalar(c2)),
        ),
        None => (grad.clone().mul_scalar(c1), grad.square().mul_scalar(c2)),
    };
    let (combined, epsilon) = step.factors();
    let update = m
        .clone()
        .mul_scalar(combined)
        .div(v.clone().sqrt().add_scalar(epsilon));
    (param - update.mul_scalar(step.lr), m, v)
}

/// The EMA blend through the installed kernel for `B`.
pub fn blend<B: Backend>(target: Tensor<B, 1>, source: Tensor<B, 1>, decay: f64) -> Tensor<B, 1> {
    (get::<B>().blend)(target, source, decay)
}

/// `target·decay + source·(1 − decay)` in burn's operations.
pub fn generic_blend<B: Backend>(target: Tensor<B, 1>, source: Tensor<B, 1>, decay: f64) -> Tensor<B, 1> {
    target.mul_scalar(decay) + source.mul_scalar(1.0 - decay)
}
