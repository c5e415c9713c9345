//! The U-Net as a whole: parameter count, shapes, conditioning, a training step.

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use diffusion_core::{Labels, NO_CLASS};
use diffusion_model::UNetConfig;

type B = Flex;
type AB = Autodiff<Flex>;

fn values<const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn reference_config_has_the_reference_parameter_count() {
    let unet = UNetConfig::new().init::<B>(&Default::default()).unwrap();
    assert_eq!(unet.num_params(), 2_038_132);
    // The time table is a constant, not among them: 501 x 112 values.
    assert_eq!(unet.time_table.dims(), [501, 112]);
}

#[test]
fn output_shapes() {
    let device = Default::default();
    let cases = [
        ("reference", UNetConfig::new(), 1, 28),
        (
            "3x32x32, four down levels",
            UNetConfig::new()
                .with_image_channels(3)
                .with_image_size(32)
                .with_widths(vec![8, 16, 32, 32, 64])
                .with_strides(vec![2, 2, 2, 2])
                .with_up_widths(vec![32, 32, 16, 8])
                .with_attention(vec![false, false, true, true, true]),
            3,
            32,
        ),
        (
            "no attention at the two finest levels",
            UNetConfig::new().with_attention(vec![false, false, true, true]),
            1,
            28,
        ),
        (
            "unconditional 1x20x20, odd sizes",
            UNetConfig::new()
                .with_image_size(20)
                .with_strides(vec![3, 2, 2])
                .with_num_classes(None),
            1,
            20,
        ),
    ];
    for (name, config, c, size) in cases {
        let unet = config
            .init::<B>(&device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = Tensor::<B, 4>::random([2, c, size, size], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<B, 1, Int>::from_ints([1, 500], &device);
        let classes = config
            .num_classes
            .map(|_| Tensor::<B, 1, Int>::from_ints([3, 9], &device));
        let y = unet.forward(x, t, classes);
        assert_eq!(y.dims(), [2, c, size, size], "{name}");
        assert!(values(y).iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn impossible_configs_are_refused_with_a_message() {
    let device = Default::default();
    let cases = [
        UNetConfig::new().with_strides(vec![2, 2]),
        UNetConfig::new().with_up_widths(vec![64, 32]),
        UNetConfig::new().with_attention(vec![true]),
        UNetConfig::new().with_embed_dim(111),
        UNetConfig::new().with_image_size(4).with_strides(vec![4, 4, 4]),
        UNetConfig::new().with_num_classes(Some(0)),
    ];
    for config in cases {
        let err = config.init::<B>(&device).expect_err("config must be refused");
        assert!(
            err.to_string().starts_with("invalid U-Net configuration: "),
            "{err}"
        );
    }
}

#[test]
fn no_class_samples_match_the_unconditional_forward() {
    let device = Default::default();
    let unet = UNetConfig::new().init::<B>(&device).unwrap();
    let x = Tensor::<B, 4>::random([2, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1, Int>::from_ints([120, 300], &device);
    let mixed = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![7i32, NO_CLASS as i32], [2]), &device);
    let y_mixed = values(unet.forward_labels(x.clone(), t.clone(), Labels::WithDropped(mixed)));
    let y_cond = values(unet.forward(x.clone(), t.clone(), Some(Tensor::from_ints([7, 7], &device))));
    let y_uncond = values(unet.forward(x, t, None));
    let half = 28 * 28;
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(
        max_diff(&y_mixed[..half], &y_cond[..half]) < 1e-5,
        "sample 0 must be conditional"
    );
    assert!(
        max_diff(&y_mixed[half..], &y_uncond[half..]) < 1e-5,
        "sample 1 must be unconditional"
    );
    assert!(
        max_diff(&y_cond[half..], &y_uncond[half..]) > 1e-4,
        "the class must change the output"
    );
}

/// Collects every float parameter, flattened, in visit order, with its
/// path; with `grads`, their gradients instead.
struct Collect<'a, B: AutodiffBackend> {
    grads: Option<&'a B::Gradients>,
    out: Vec<Option<Vec<f32>>>,
    path: Vec<String>,
    paths: Vec<String>,
}

impl<'a, B: AutodiffBackend> Collect<'a, B> {
    fn new(grads: Option<&'a B::Gradients>) -> Self {
        Self {
            grads,
            out: vec![],
            path: vec![],
            paths: vec![],
        }
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.paths.push(self.path.join("."));
        let v = match self.grads {
            Some(g) => param
                .val()
                .grad(g)
                .map(|t| t.into_data().convert::<f32>().to_vec::<f32>().unwrap()),
            None => Some(
                param
                    .val()
                    .inner()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap(),
            ),
        };
        self.out.push(v);
    }
}

#[test]
fn one_training_step_updates_every_parameter() {
    let device = Default::default();
    AB::seed(&device, 3);
    let model = UNetConfig::new().init::<AB>(&device).unwrap();
    let mut optim = AdamConfig::new().init::<AB, diffusion_model::UNet<AB>>();
    let x = Tensor::<AB, 4>::random([4, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let eps = Tensor::<AB, 4>::random([4, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<AB, 1, Int>::from_ints([1, 100, 250, 500], &device);
    let classes = Tensor::<AB, 1, Int>::from_ints([0, 3, 5, 9], &device);

    let mut before = Collect::<AB>::new(None);
    model.visit(&mut before);

    let loss = (model.forward(x, t, Some(classes)) - eps).powi_scalar(2).mean();
    let grads = loss.backward();
    let mut g = Collect::<AB>::new(Some(&grads));
    model.visit(&mut g);
    // The time table is a plain tensor (a constant): it has no gradient.
    assert!(model.time_table.grad(&grads).is_none());
    assert_eq!(g.out.len(), before.out.len());
    // The reference's first block works on one channel, and GroupNorm(1, 1)
    // subtracts that channel's per-sample mean: whatever the depthwise bias
    // and the time and class projections add there (a per-sample constant)
    // is removed, so their exact gradient is 0 and only rounding is left.
    let inert = |path: &str| {
        path == "stem.convnext.depthwise.bias"
            || path.starts_with("stem.convnext.time_proj.")
            || path.starts_with("stem.convnext.class_proj.")
    };
    assert_eq!(g.paths.iter().filter(|p| inert(p)).count(), 5, "{:?}", g.paths);
    for (i, grad) in g.out.iter().enumerate() {
        let path = &g.paths[i];
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{path} has no gradient"));
        assert!(
            grad.iter().all(|v| v.is_finite()),
            "{path} has a non-finite gradient"
        );
        if inert(path) {
            assert!(
                grad.iter().all(|v| v.abs() < 1e-5),
                "{path} should have a zero gradient"
            );
        } else {
            assert!(grad.iter().any(|&v| v != 0.0), "{path} has an all-zero gradient");
        }
    }

    let paths = g.paths.clone();
    drop(g);
    let grads = GradientsParams::from_grads(grads, &model);
    let model = optim.step(1e-3, model, grads);
    let mut after = Collect::<AB>::new(None);
    model.visit(&mut after);
    let mut total = 0;
    for (i, (b, a)) in before.out.iter().zip(&after.out).enumerate() {
        let (b, a) = (b.as_ref().unwrap(), a.as_ref().unwrap());
        assert_eq!(a.len(), b.len());
        let path = &paths[i];
        assert!(
            inert(path) || b.iter().zip(a).any(|(x, y)| x != y),
            "{path} did not change"
        );
        total += a.len();
    }
    assert_eq!(total, 2_038_132);
}
