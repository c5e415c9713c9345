//! The sampling loop.

use crate::rng::SplitMix64;
use burn::tensor::{backend::Backend, Distribution, Int, Tensor};

use crate::denoiser::Denoiser;
use crate::sampler::Sampler;

/// Where a step is, for progress bars and animation frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInfo {
    /// Step index i, from 0.
    pub index: usize,
    /// Total number of steps n.
    pub num_steps: usize,
    /// The timestep the denoiser was evaluated at, `t[i]`.
    pub t: usize,
    /// The timestep x is at after the step, `t[i+1]`.
    pub t_next: usize,
}

/// Standard normal noise for the stochastic samplers' steps.
pub trait NoiseSource<B: Backend> {
    /// A tensor of independent N(0, 1) values of `shape` on `device`.
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4>;
}

/// Noise from the backend's own generator (seed it with `B::seed`).
#[derive(Debug, Clone, Copy, Default)]
pub struct BackendNoise;

impl<B: Backend> NoiseSource<B> for BackendNoise {
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }
}

/// Noise from a seeded generator on the host (splitmix64 + Box-Muller),
/// uploaded each time: the same numbers on every backend and whatever
/// other threads draw, at the cost of a host-to-device copy per draw.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: SplitMix64,
}

impl SeededNoise {
    /// A noise stream that starts at `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
        }
    }

    fn uniform(&mut self) -> f64 {
        self.rng.uniform_open0()
    }

    /// `n` independent N(0, 1) values.
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (r, theta) = (
                (-2.0 * self.uniform().ln()).sqrt(),
                std::f64::consts::TAU * self.uniform(),
            );
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

impl<B: Backend> NoiseSource<B> for SeededNoise {
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let n = shape.iter().product();
        Tensor::from_data(burn::tensor::TensorData::new(self.values(n), shape), device)
    }
}

impl<B: Backend, F: FnMut([usize; 4], &B::Device) -> Tensor<B, 4>> NoiseSource<B> for F {
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        self(shape, device)
    }
}

/// Runs the reverse process from `x` (noise at the sampler's first
/// timestep) to its last timestep, and returns the result.
///
/// `on_step` is called after every step with the new x (read it only when
/// needed: reading a tensor's data waits for the device). Run this on a
/// backend without autodiff (`model.valid()` in burn), or the graph of every
/// step is kept.
///
/// # Shapes
/// `x`: `[B, C, H, W]`; `classes`: `[B]`; returns `[B, C, H, W]`.
pub fn sample<B, D, S>(
    denoiser: &D,
    sampler: &mut S,
    mut x: Tensor<B, 4>,
    classes: Option<Tensor<B, 1, Int>>,
    noise: &mut impl NoiseSource<B>,
    mut on_step: impl FnMut(StepInfo, &Tensor<B, 4>),
) -> Tensor<B, 4>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
    S: Sampler<B> + ?Sized,
{
    sampler.reset();
    let timesteps = sampler.timesteps().to_vec();
    let num_steps = timesteps.len() - 1;
    let prediction = denoiser.prediction();
    let device = x.device();
    for i in 0..num_steps {
        let t = timesteps[i];
        let output = denoiser.denoise(x.clone(), t, classes.clone());
        let z = sampler.needs_noise(i).then(|| noise.sample(x.dims(), &device));
        x = sampler.step(i, x, output, prediction, z);
        on_step(
            StepInfo {
                index: i,
                num_steps,
                t,
                t_next: timesteps[i + 1],
            },
            &x,
        );
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_standard_normal_and_repeatable() {
        let v = SeededNoise::new(42).values(200_001);
        assert_eq!(v[..100], SeededNoise::new(42).values(100)[..]);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // Standard errors: 1/√n ≈ 0.0022 for the mean, √(2/n) ≈ 0.0032 for the variance.
        assert!(
            mean.abs() < 0.011 && (var - 1.0).abs() < 0.016,
            "mean {mean}, var {var}"
        );
    }
}
