//! The whole reference U-Net with and without the kernels installed.
//! (The only test in this binary, so installing cannot race with another.)

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_model::kernels::{self, Kernels};
use diffusion_model::{UNet, UNetConfig};

type Ad = Autodiff<Flex>;

fn use_kernels(ours: bool) {
    if ours {
        diffusion_flex_kernels::install_for_unet();
    } else {
        kernels::install::<Flex>(Kernels::default());
        kernels::install::<Ad>(Kernels::default());
    }
}

/// Measured when written: output 8.9e-7, gradients 5e-7 to 1.4e-6
/// (relative to the largest value), i.e. float rounding.
#[test]
fn reference_unet_output_and_gradients_match_burn_generic() {
    let device = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&device, 7);
    let model: UNet<Ad> = UNetConfig::new().init(&device).unwrap();
    let x = Tensor::<Ad, 4>::random([3, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<Ad, 1, Int>::from_ints([3, 250, 499], &device);
    let c = Tensor::<Ad, 1, Int>::from_ints([0, 4, 9], &device);
    let eps = Tensor::<Ad, 4>::random([3, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let run = |ours: bool| {
        use_kernels(ours);
        let inference = values(model.valid().forward(
            x.clone().inner(),
            t.clone().inner(),
            Some(c.clone().inner()),
        ));
        let y = model.forward(x.clone(), t.clone(), Some(c.clone()));
        let loss = (y - eps.clone()).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // The gradient of a few parameters of every kind of block.
        let g = |p: &burn::module::Param<Tensor<Ad, 4>>| values(grads.get::<Flex, 4>(p.id).unwrap());
        let picked = vec![
            g(&model.head.depthwise.weight),
            g(&model.stem.convnext.conv1.weight),
            g(&model.head.conv2.weight),
        ];
        let attention = values(
            grads
                .get::<Flex, 2>(model.stem.attention.as_ref().unwrap().qkv.weight.id)
                .unwrap(),
        );
        (inference, picked, attention)
    };
    // Sampling must be reproducible: the same input gives the same bits on
    // every call (each output of a kernel is summed by one task, in a fixed
    // order, whatever rayon's scheduling).
    use_kernels(true);
    let forward = || {
        values(
            model
                .valid()
                .forward(x.clone().inner(), t.clone().inner(), Some(c.clone().inner())),
        )
    };
    let first = forward();
    for _ in 0..3 {
        assert!(
            forward() == first,
            "two inference passes on the same input differ"
        );
    }
    let (ours, ours_g, ours_att) = run(true);
    let (generic, generic_g, generic_att) = run(false);
    use_kernels(true);
    let scale = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rel = |a: &[f32], b: &[f32]| max_abs_diff(a, b) / scale(b).max(1e-12);
    assert!(rel(&ours, &generic) < 1e-5, "output: {}", rel(&ours, &generic));
    for (i, (a, b)) in ours_g.iter().zip(&generic_g).enumerate() {
        assert!(rel(a, b) < 1e-5, "gradient {i}: {}", rel(a, b));
    }
    assert!(
        rel(&ours_att, &generic_att) < 1e-5,
        "attention gradient: {}",
        rel(&ours_att, &generic_att)
    );
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
