//! The sampling loop.

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
    /// The timestep the denoiser was evaluated at, t[i].
    pub t: usize,
    /// The timestep x is at after the step, t[i+1].
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
/// `x`: [B, C, H, W]; `classes`: [B]; returns [B, C, H, W].
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
