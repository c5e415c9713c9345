//! Forward and forward+backward of the reference U-Net on the CPU backend
//! (burn's Flex). GPU numbers come from `cargo xtask bench --backend cuda|wgpu`,
//! since only the CLI crate may name a GPU backend.
//!
//!     cargo bench -p diffusion-model

// `criterion_group!` defines a public function it gives no doc comment.
#![allow(missing_docs)]

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diffusion_model::UNetConfig;

fn inputs<B: Backend>(n: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
    let x = Tensor::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::random([n], Distribution::Uniform(1.0, 500.0), device);
    let c = Tensor::random([n], Distribution::Uniform(0.0, 9.0), device);
    (x, t, c)
}

fn forward(c: &mut Criterion) {
    let device = Default::default();
    let model = UNetConfig::new().init::<Flex>(&device).unwrap();
    let mut group = c.benchmark_group("unet_forward_cpu");
    group.sample_size(10);
    for n in [1usize, 81] {
        let (x, t, cl) = inputs::<Flex>(n, &device);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| model.forward(x.clone(), t.clone(), Some(cl.clone())).into_data())
        });
    }
    group.finish();
}

fn forward_backward(c: &mut Criterion) {
    type AB = Autodiff<Flex>;
    let device = Default::default();
    let model = UNetConfig::new().init::<AB>(&device).unwrap();
    let mut group = c.benchmark_group("unet_forward_backward_cpu");
    group.sample_size(10);
    for n in [32usize, 128] {
        let (x, t, cl) = inputs::<AB>(n, &device);
        let eps = Tensor::<AB, 4>::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let loss = (model.forward(x.clone(), t.clone(), Some(cl.clone())) - eps.clone())
                    .powi_scalar(2)
                    .mean();
                loss.backward()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward, forward_backward);
criterion_main!(benches);
