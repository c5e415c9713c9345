//! The reference U-Net on the CPU backend with burn's generic operations
//! and with this crate's CPU kernels installed, side by side in one run.
//!
//!     cargo bench -p diffusion-flex-kernels --features unet

// `criterion_group!` defines a public function it gives no doc comment.
#![allow(missing_docs)]

use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diffusion_model::kernels::{self, Kernels};
use diffusion_model::{AttentionConfig, ConvNeXtConfig, UNetConfig};

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
    // The two 28x28 attentions: the stem block's (784 tokens of width 16)
    // and the last up block's (width 8, where the backward's dq is made by
    // dot products instead of gemm).
    let device = Default::default();
    for d in [16, 8] {
        let mut group = c.benchmark_group(format!("attention_784x{d}_forward_backward_b32"));
        group.sample_size(10);
        let make =
            || Tensor::<AB, 3>::random([32, 784, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
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
}

fn conv3x3(c: &mut Criterion) {
    // The U-Net's 3x3 convs (stride 1, padding 1) at 14x14 and 7x7, the
    // ones Winograd F(4x4, 3x3) computes, batch 81 (sampling's): the
    // installed kernel against burn's conv, inference.
    let device = Default::default();
    for (cin, cout, size) in [
        (32, 96, 14),
        (96, 32, 14),
        (64, 96, 14),
        (64, 192, 7),
        (192, 64, 7),
        (128, 192, 7),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init::<Flex>(&device);
        let x = Tensor::<Flex, 4>::random([81, cin, size, size], Distribution::Normal(0.0, 1.0), &device);
        let mut group = c.benchmark_group(format!("conv3x3_{cin}to{cout}_{size}x{size}_b81"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(81));
        for ours in [false, true] {
            let name = use_kernels(ours);
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| kernels::conv2d(&conv, x.clone()).into_data())
            });
        }
        group.finish();
    }
}

fn convnext_block(c: &mut Criterion) {
    // The ConvNeXt blocks of the 28x28 level (1 → 16 in the stem, 32 → 8 up
    // the U-Net) and of the 7x7 level (128 → 64), batch 81: the installed
    // kernel (fused) against the same block composed of the separate
    // kernels (conv2d, group norm, GELU), inference.
    let device = Default::default();
    diffusion_flex_kernels::install_for_unet();
    for (cin, cout, size) in [(1, 16, 28), (32, 8, 28), (128, 64, 7)] {
        let block = ConvNeXtConfig::new(cin, cout, 128).init::<Flex>(&device);
        let x = Tensor::<Flex, 4>::random([81, cin, size, size], Distribution::Normal(0.0, 1.0), &device);
        let cond = Tensor::<Flex, 2>::random([81, cin], Distribution::Normal(0.0, 1.0), &device);
        let mut group = c.benchmark_group(format!("convnext_block_{cin}to{cout}_{size}x{size}_b81"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(81));
        group.bench_function("separate_kernels", |b| {
            b.iter(|| block.forward_generic(x.clone(), cond.clone()).into_data())
        });
        group.bench_function("fused", |b| {
            b.iter(|| kernels::convnext_block(&block, x.clone(), cond.clone()).into_data())
        });
        group.finish();
    }
}

fn attention_block_training(c: &mut Criterion) {
    // The attention blocks of the 28x28 level (d = 16, the stem) and of the
    // 14x14 level (d = 32) under autodiff, batch 32, forward + backward: the
    // installed kernel (one operation after the group norm) against the
    // same block composed of the separate kernels (group norm, burn's
    // linear layers and slices, FlashAttention).
    let device = Default::default();
    diffusion_flex_kernels::install_for_unet();
    for (d, size) in [(16, 28), (32, 14)] {
        let block = AttentionConfig::new(d).init::<AB>(&device);
        let x = Tensor::<AB, 4>::random([32, d, size, size], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let mut group = c.benchmark_group(format!("attention_block_d{d}_{size}x{size}_forward_backward_b32"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(32));
        group.bench_function("separate_kernels", |b| {
            b.iter(|| block.forward_generic(x.clone()).sum().backward())
        });
        group.bench_function("fused", |b| {
            b.iter(|| kernels::attention_block(&block, x.clone()).sum().backward())
        });
        group.finish();
    }
}

criterion_group!(
    benches,
    forward,
    forward_backward,
    attention,
    conv3x3,
    convnext_block,
    attention_block_training
);
criterion_main!(benches);
