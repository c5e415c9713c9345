//! The reference U-Net on the CPU backend with burn's generic operations
//! and with this crate's CPU kernels installed, side by side in one run.
//!
//!     cargo bench -p diffusion-flex-kernels --features unet

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diffusion_model::kernels::{self, Kernels};
use diffusion_model::UNetConfig;

type AB = Autodiff<Flex>;

fn inputs<B: Backend>(n: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
    let x = Tensor::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::random([n], Distribution::Uniform(1.0, 500.0), device);
    let c = Tensor::random([n], Distribution::Uniform(0.0, 9.0), device);
    (x, t, c)
}

/// Installs burn's generic kernels or ours for both CPU backend types.
fn use_kernels(ours: bool) -> &'static str {
    if ours {
        diffusion_flex_kernels::install_for_unet();
        "flex_kernels"
    } else {
        kernels::install::<Flex>(Kernels::default());
        kernels::install::<AB>(Kernels::default());
        "burn_generic"
    }
}

fn forward(c: &mut Criterion) {
    let device = Default::default();
    let model = UNetConfig::new().init::<Flex>(&device).unwrap();
    let mut group = c.benchmark_group("unet_forward_b81");
    group.sample_size(10);
    let n = 81;
    let (x, t, cl) = inputs::<Flex>(n, &device);
    group.throughput(Throughput::Elements(n as u64));
    for ours in [false, true] {
        let name = use_kernels(ours);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| model.forward(x.clone(), t.clone(), Some(cl.clone())).into_data())
        });
    }
    group.finish();
}

fn forward_backward(c: &mut Criterion) {
    let device = Default::default();
    let model = UNetConfig::new().init::<AB>(&device).unwrap();
    let mut group = c.benchmark_group("unet_forward_backward_b32");
    group.sample_size(10);
    let n = 32;
    let (x, t, cl) = inputs::<AB>(n, &device);
    let eps = Tensor::<AB, 4>::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    group.throughput(Throughput::Elements(n as u64));
    for ours in [false, true] {
        let name = use_kernels(ours);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
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

fn attention(c: &mut Criterion) {
    // One 28x28 attention of the stem block: 784 tokens of width 16.
    let device = Default::default();
    let mut group = c.benchmark_group("attention_784x16_forward_backward_b32");
    group.sample_size(10);
    let make =
        || Tensor::<AB, 3>::random([32, 784, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let (q, k, v) = (make(), make(), make());
    for ours in [false, true] {
        let name = use_kernels(ours);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                kernels::attention(q.clone(), k.clone(), v.clone())
                    .sum()
                    .backward()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward, forward_backward, attention);
criterion_main!(benches);
