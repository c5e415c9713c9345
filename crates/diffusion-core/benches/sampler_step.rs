//! One sampler step (the update, without the network) on a batch of 81
//! 28x28 images, on the CPU backend.
//!
//!     cargo bench -p diffusion-core

// `criterion_group!` defines a public function it gives no doc comment.
#![allow(missing_docs)]

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use diffusion_core::{NoiseSchedule, Prediction, SamplerConfig, SamplerKind};

fn sampler_step(c: &mut Criterion) {
    let device = Default::default();
    let schedule = NoiseSchedule::reference();
    let x = Tensor::<Flex, 4>::random([81, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let eps = Tensor::<Flex, 4>::random([81, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let z = Tensor::<Flex, 4>::random([81, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let mut group = c.benchmark_group("sampler_step_81x28x28");
    for (name, kind) in [
        ("reference", SamplerKind::Reference { eta: 0.1 }),
        ("ddpm", SamplerKind::Ddpm),
        ("ddim", SamplerKind::Ddim { eta: 0.0 }),
        ("dpm_solver_pp", SamplerKind::DpmSolverPp),
    ] {
        let mut sampler = SamplerConfig::new(kind, 35).build::<Flex>(&schedule).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let out = sampler.step(3, x.clone(), eps.clone(), Prediction::Epsilon, Some(z.clone()));
                out.into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sampler_step);
criterion_main!(benches);
