//! Costs of the U-Net's operations, forward + backward, on the CPU backend.
//! `cargo run --release -p diffusion-model --example op_costs -- [batch]`
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::Distribution;
use diffusion_model::{AttentionConfig, AttentionImpl, UNetConfig};

type B = Autodiff<Flex>;

fn time<F: FnMut() -> Tensor<B, 4>>(name: &str, mut f: F) {
    let run = |f: &mut F| {
        let y = f();
        let g = y.sum().backward();
        drop(g);
    };
    run(&mut f);
    let n = 3;
    let t = Instant::now();
    for _ in 0..n {
        run(&mut f);
    }
    println!("{name:50} {:9.2} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
}

fn main() {
    let b: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(32);
    let dev = Default::default();
    let x = |c: usize, s: usize| {
        Tensor::<B, 4>::random([b, c, s, s], Distribution::Normal(0., 1.), &dev).require_grad()
    };
    let pad = |p| PaddingConfig2d::Explicit(p, p, p, p);
    for (c, s) in [(16, 28), (32, 14), (64, 7), (128, 3)] {
        let dw = Conv2dConfig::new([c, c], [7, 7])
            .with_groups(c)
            .with_padding(pad(3))
            .init::<B>(&dev);
        let xi = x(c, s);
        time(&format!("depthwise7 c{c} s{s}"), || dw.forward(xi.clone()));
        let c1 = Conv2dConfig::new([c, 3 * c], [3, 3])
            .with_padding(pad(1))
            .init::<B>(&dev);
        time(&format!("conv3 c{c}->{} s{s}", 3 * c), || c1.forward(xi.clone()));
        let c2 = Conv2dConfig::new([3 * c, c], [3, 3])
            .with_padding(pad(1))
            .init::<B>(&dev);
        let xh = x(3 * c, s);
        time(&format!("conv3 c{}->{c} s{s}", 3 * c), || c2.forward(xh.clone()));
        let gn = GroupNormConfig::new(1, 3 * c).init::<B>(&dev);
        time(&format!("groupnorm c{} s{s}", 3 * c), || gn.forward(xh.clone()));
        time(&format!("gelu c{} s{s}", 3 * c), || gelu(xh.clone()));
        let cond = Tensor::<B, 2>::random([b, c], Distribution::Normal(0., 1.), &dev).require_grad();
        time(&format!("bcast add c{c} s{s}"), || {
            xi.clone() + cond.clone().reshape([b, c, 1, 1])
        });
        for imp in [AttentionImpl::Fused, AttentionImpl::Explicit] {
            let at = AttentionConfig::new(c).with_implementation(imp).init::<B>(&dev);
            time(&format!("attention {imp:?} c{c} s{s}"), || at.forward(xi.clone()));
        }
    }
    let unet = UNetConfig::new().init::<B>(&dev).unwrap();
    let xi = x(1, 28);
    let t = Tensor::<B, 1, Int>::from_ints(vec![7; b].as_slice(), &dev);
    let cl = Tensor::<B, 1, Int>::from_ints(vec![3; b].as_slice(), &dev);
    time("whole unet", || {
        unet.forward(xi.clone(), t.clone(), Some(cl.clone()))
    });
}
