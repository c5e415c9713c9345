//! Classifier-free guidance (Ho & Salimans 2022).
//!
//! out = out_uncond + w·(out_cond − out_uncond); w = 1 is plain
//! conditional sampling, w > 1 trades diversity for fidelity. Both branches
//! run in one denoiser call over a doubled batch, the second half with every
//! class set to [`NO_CLASS`]. The combination is linear in the network
//! output, so it holds for ε, x0 and v predictions alike.

use burn::tensor::{backend::Backend, Int, Tensor};

use crate::denoiser::Denoiser;
use crate::prediction::Prediction;

/// The class id that asks a denoiser for its unconditional branch: label
/// dropout in training writes it, guidance passes it, a class-conditional
/// model leaves the class term out for such a sample.
pub const NO_CLASS: i64 = -1;

/// A denoiser with classifier-free guidance of scale `scale`.
#[derive(Debug, Clone, Copy)]
pub struct Guided<'a, D: ?Sized> {
    /// The class-conditional denoiser whose two branches are combined.
    pub inner: &'a D,
    /// Guidance weight w: 1 is plain conditional sampling, > 1 strengthens the class.
    pub scale: f64,
}

impl<'a, D: ?Sized> Guided<'a, D> {
    /// Wraps `inner` with guidance weight `scale`.
    pub fn new(inner: &'a D, scale: f64) -> Self {
        Self { inner, scale }
    }
}

impl<B: Backend, D: Denoiser<B> + ?Sized> Denoiser<B> for Guided<'_, D> {
    fn denoise(&self, x_t: Tensor<B, 4>, t: usize, classes: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        let Some(classes) = classes else {
            return self.inner.denoise(x_t, t, None);
        };
        if self.scale == 1.0 {
            return self.inner.denoise(x_t, t, Some(classes));
        }
        let n = x_t.dims()[0];
        let null = classes.full_like(NO_CLASS);
        let both = self.inner.denoise(
            Tensor::cat(vec![x_t.clone(), x_t], 0),
            t,
            Some(Tensor::cat(vec![classes, null], 0)),
        );
        let cond = both.clone().narrow(0, 0, n);
        let uncond = both.narrow(0, n, n);
        uncond.clone() + (cond - uncond).mul_scalar(self.scale)
    }

    fn prediction(&self) -> Prediction {
        self.inner.prediction()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, tensor, TestBackend};
    use burn::tensor::TensorData;

    /// A stand-in: x·(1 + class) for a class, x·0.5 for the null class.
    fn model(
        x: Tensor<TestBackend, 4>,
        _t: usize,
        c: Option<Tensor<TestBackend, 1, Int>>,
    ) -> Tensor<TestBackend, 4> {
        let n = x.dims()[0];
        let c = c.unwrap().float().reshape([n, 1, 1, 1]);
        let is_null = c.clone().lower_elem(0.0).float();
        let factor = is_null.clone().mul_scalar(0.5) + (c.add_scalar(1.0)) * is_null.neg().add_scalar(1.0);
        x * factor
    }

    #[test]
    fn guidance_mixes_the_two_branches() {
        let device = Default::default();
        let x = tensor(&[1.0, 2.0], [2, 1, 1, 1]);
        let classes = Tensor::<TestBackend, 1, Int>::from_data(TensorData::new(vec![0i32, 2], [2]), &device);
        // cond = x·(1 + c) = [1, 6]; uncond = x·0.5 = [0.5, 1];
        // w = 3: uncond + 3·(cond − uncond) = [2, 16].
        let out = Guided::new(&model, 3.0).denoise(x.clone(), 10, Some(classes.clone()));
        assert!(max_abs_diff(&out, &tensor(&[2.0, 16.0], [2, 1, 1, 1])) < 1e-6);
        let plain = Guided::new(&model, 1.0).denoise(x, 10, Some(classes));
        assert!(max_abs_diff(&plain, &tensor(&[1.0, 6.0], [2, 1, 1, 1])) < 1e-6);
    }
}
