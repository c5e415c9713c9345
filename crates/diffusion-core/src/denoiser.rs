//! The one thing samplers need from a model.

use burn::tensor::{backend::Backend, Int, Tensor};

use crate::prediction::Prediction;

/// A network (or any function) that, given x_t at one timestep t for the
/// whole batch and optional class labels, predicts ε, x0 or v.
///
/// Closures `Fn(Tensor<B, 4>, usize, Option<Tensor<B, 1, Int>>) -> Tensor<B, 4>`
/// are denoisers that predict ε.
pub trait Denoiser<B: Backend> {
    /// The prediction at (x_t, t).
    ///
    /// # Shapes
    /// - `x_t`: [B, C, H, W]
    /// - `classes`: `[B]`, or `None` for an unconditional model or pass
    /// - returns [B, C, H, W]
    fn denoise(&self, x_t: Tensor<B, 4>, t: usize, classes: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4>;

    /// What [`Denoiser::denoise`] predicts.
    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}

impl<B, F> Denoiser<B> for F
where
    B: Backend,
    F: Fn(Tensor<B, 4>, usize, Option<Tensor<B, 1, Int>>) -> Tensor<B, 4>,
{
    fn denoise(&self, x_t: Tensor<B, 4>, t: usize, classes: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        self(x_t, t, classes)
    }
}

/// The class labels of a batch, and what a network may assume about them.
#[derive(Debug, Clone)]
pub enum Labels<B: Backend> {
    /// No labels: an unconditional model, or the class term left out for
    /// the whole batch.
    None,
    /// One class id per sample, every one in `0..num_classes`.
    Classes(Tensor<B, 1, Int>),
    /// One class id per sample, some of which may be [`crate::NO_CLASS`]
    /// (dropped by label dropout, or the unconditional half of guidance).
    WithDropped(Tensor<B, 1, Int>),
}

impl<B: Backend> Labels<B> {
    /// The ids, if any.
    pub fn ids(&self) -> Option<&Tensor<B, 1, Int>> {
        match self {
            Labels::None => None,
            Labels::Classes(c) | Labels::WithDropped(c) => Some(c),
        }
    }

    /// Samples `[start, start + len)` of the batch.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        match self {
            Labels::None => Labels::None,
            Labels::Classes(c) => Labels::Classes(c.clone().narrow(0, start, len)),
            Labels::WithDropped(c) => Labels::WithDropped(c.clone().narrow(0, start, len)),
        }
    }
}

/// A network trained as a denoiser: one timestep per sample (a training
/// batch mixes noise levels), predicting ε, x0 or v.
pub trait BatchDenoiser<B: Backend> {
    /// The prediction at (x_t, t) for each sample.
    ///
    /// # Shapes
    /// - `x_t`: [B, C, H, W]
    /// - `t`: `[B]`, integers in 1..=T
    /// - returns [B, C, H, W]
    fn predict(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1, Int>, labels: Labels<B>) -> Tensor<B, 4>;

    /// What [`BatchDenoiser::predict`] predicts.
    fn prediction(&self) -> Prediction;
}
