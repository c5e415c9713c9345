//! The forward (noising) process q(x_t | x0).

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::schedule::NoiseSchedule;

/// The forward process on a device: √ᾱ(t) and √(1−ᾱ(t)) for t = 0..=T as
/// device tensors, so that a training step looks them up by per-sample t
/// without a host round trip.
#[derive(Debug, Clone)]
pub struct ForwardProcess<B: Backend> {
    alpha_bar: Tensor<B, 1>,
    sqrt_alpha_bar: Tensor<B, 1>,
    sqrt_one_minus_alpha_bar: Tensor<B, 1>,
}

impl<B: Backend> ForwardProcess<B> {
    /// Uploads the schedule's table (converted from f64 to the backend's float).
    pub fn new(schedule: &NoiseSchedule, device: &B::Device) -> Self {
        let ab = schedule.alpha_bars();
        let upload = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = ab.iter().map(|&a| f(a) as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(v, [ab.len()]), device)
        };
        Self {
            alpha_bar: upload(&|a| a),
            sqrt_alpha_bar: upload(&|a| a.sqrt()),
            sqrt_one_minus_alpha_bar: upload(&|a| (1.0 - a).sqrt()),
        }
    }

    /// ᾱ(t) per sample, shaped [B, 1, 1, 1] to broadcast over images.
    pub fn alpha_bar(&self, t: Tensor<B, 1, Int>) -> Tensor<B, 4> {
        let n = t.dims()[0];
        self.alpha_bar.clone().select(0, t).reshape([n, 1, 1, 1])
    }

    /// x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε with one t per sample.
    ///
    /// # Shapes
    /// - `x0`, `eps`: [B, C, H, W]
    /// - `t`: `[B]`, integers in 0..=T
    /// - returns [B, C, H, W]
    pub fn noise(&self, x0: Tensor<B, 4>, t: Tensor<B, 1, Int>, eps: Tensor<B, 4>) -> Tensor<B, 4> {
        let n = t.dims()[0];
        let sa = self
            .sqrt_alpha_bar
            .clone()
            .select(0, t.clone())
            .reshape([n, 1, 1, 1]);
        let sb = self
            .sqrt_one_minus_alpha_bar
            .clone()
            .select(0, t)
            .reshape([n, 1, 1, 1]);
        x0 * sa + eps * sb
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, tensor, TestBackend};

    #[test]
    fn noise_uses_each_samples_own_t() {
        let s = NoiseSchedule::reference();
        let device = Default::default();
        let fp = ForwardProcess::<TestBackend>::new(&s, &device);
        let x0 = tensor(&[0.5, -1.0], [2, 1, 1, 1]);
        let eps = tensor(&[1.0, 0.25], [2, 1, 1, 1]);
        let t = Tensor::<TestBackend, 1, Int>::from_data(TensorData::new(vec![250i64, 1], [2]), &device);
        let x_t = fp.noise(x0, t, eps);
        let f = |t: usize, x0: f64, e: f64| s.alpha_bar(t).sqrt() * x0 + (1.0 - s.alpha_bar(t)).sqrt() * e;
        let expect = [f(250, 0.5, 1.0) as f32, f(1, -1.0, 0.25) as f32];
        assert!(max_abs_diff(&x_t, &tensor(&expect, [2, 1, 1, 1])) < 1e-6);
    }
}
