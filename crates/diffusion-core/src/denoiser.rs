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
