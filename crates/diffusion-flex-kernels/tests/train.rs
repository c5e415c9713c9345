//! Adam's and the EMA's Flex kernels against the trainer's generic ones
//! (burn's operations): the same bits, on the calling thread and in
//! parallel, and a tensor another holder shares is never written.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use diffusion_flex_kernels::optim;
use diffusion_train::kernels::{self, generic_adam_step, generic_blend, AdamStep, AdamStepFn, BlendFn};

/// `n` values spread over magnitudes 1e-6 to 1 of both signs (a
/// deterministic generator), with a negative zero and a zero among them.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let magnitude = 10f32.powi(-(((state >> 20) % 7) as i32));
            match i % 97 {
                3 => -0.0,
                5 => 0.0,
                _ => (unit * 2.0 - 1.0) * magnitude,
            }
        })
        .collect()
}

fn tensor(v: Vec<f32>) -> Tensor<Flex, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), &Default::default())
}

fn bits(t: &Tensor<Flex, 1>) -> Vec<u32> {
    t.clone()
        .into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Sizes on the calling thread (5, 1000) and split into parallel slices
/// with a short last one (2·32768 + 37).
const SIZES: [usize; 3] = [5, 1000, 2 * 32 * 1024 + 37];

/// Four Adam steps (the first without moments), at ε 1e-8 and a changing
/// learning rate: the kernel's parameter and both moments have the
/// generic step's bits after every step. A wrong rounding order (the bias
/// correction applied after the division) fails it.
#[test]
fn adam_step_has_the_bits_of_burns_adam() {
    for n in SIZES {
        let mut ours = tensor(values(n, 1));
        let mut theirs = ours.clone();
        let mut moments: [Option<(Tensor<Flex, 1>, Tensor<Flex, 1>)>; 2] = [None, None];
        for time in 1..=4 {
            let step = AdamStep {
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                lr: 0.05 * time as f64,
                time,
            };
            let grad = tensor(values(n, 10 + time as u64));
            let (p, m, v) = optim::adam_step(ours, grad.clone(), moments[0].take(), &step);
            let (q, mq, vq) = generic_adam_step(theirs, grad, moments[1].take(), &step);
            assert_eq!(bits(&p), bits(&q), "parameter, n {n}, step {time}");
            assert_eq!(bits(&m), bits(&mq), "first moment, n {n}, step {time}");
            assert_eq!(bits(&v), bits(&vq), "second moment, n {n}, step {time}");
            (ours, theirs) = (p, q);
            moments = [Some((m, v)), Some((mq, vq))];
        }
    }
}

/// A parameter, gradient or moment that another tensor shares keeps its
/// values (the kernel writes in place only into unshared buffers), and the
/// result is still the generic one's.
#[test]
fn adam_step_leaves_shared_tensors_alone() {
    let n = SIZES[2];
    let step = AdamStep {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        lr: 0.1,
        time: 3,
    };
    let (param, grad, m, v) = (
        tensor(values(n, 2)),
        tensor(values(n, 3)),
        tensor(values(n, 4)),
        tensor(values(n, 5).iter().map(|x| x * x).collect()),
    );
    let kept = [bits(&param), bits(&m), bits(&v)];
    let (p, mo, vo) = optim::adam_step(param.clone(), grad.clone(), Some((m.clone(), v.clone())), &step);
    assert_eq!([bits(&param), bits(&m), bits(&v)], kept);
    let (q, mq, vq) = generic_adam_step(param, grad, Some((m, v)), &step);
    assert_eq!([bits(&p), bits(&mo), bits(&vo)], [bits(&q), bits(&mq), bits(&vq)]);
}

/// The EMA blend at the warm-up's decays and the usual 0.999: the
/// kernel's bits are the generic blend's, in place (unshared target) and
/// into a new buffer (shared target, which keeps its values).
#[test]
fn blend_has_the_bits_of_the_generic_blend() {
    for n in SIZES {
        for decay in [0.1, 0.5, 0.9, 0.999] {
            let (target, source) = (tensor(values(n, 6)), tensor(values(n, 7)));
            let expected = bits(&generic_blend(target.clone(), source.clone(), decay));
            let kept = bits(&target);
            let shared = optim::blend(target.clone(), source.clone(), decay);
            assert_eq!(bits(&shared), expected, "shared target, n {n}, decay {decay}");
            assert_eq!(bits(&target), kept, "the shared target kept its values");
            let unshared = optim::blend(target, source, decay);
            assert_eq!(bits(&unshared), expected, "unshared target, n {n}, decay {decay}");
        }
    }
}

/// Weights and EMA of a small U-Net after three trainer steps (Adam at ε
/// 1e-8, EMA warm-up), as bits.
fn three_trainer_steps() -> Vec<u32> {
    use burn::backend::Autodiff;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::backend::Backend;
    use burn::tensor::Int;
    use diffusion_core::NoiseSchedule;
    use diffusion_model::UNetConfig;
    use diffusion_train::{Trainer, TrainerConfig};

    struct Bits(Vec<u32>);
    impl<B: Backend> ModuleVisitor<B> for Bits {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v = param.val().into_data().to_vec::<f32>().unwrap();
            self.0.extend(v.iter().map(|x| x.to_bits()));
        }
    }
    type B = Autodiff<Flex>;
    let device = Default::default();
    let unet = UNetConfig::new()
        .with_widths(vec![8, 16])
        .with_strides(vec![2])
        .with_up_widths(vec![8])
        .with_attention(vec![false, true])
        .with_image_size(8)
        .init_seeded::<B>(&device, 0)
        .unwrap();
    let mut trainer = Trainer::new(unet, &NoiseSchedule::reference(), TrainerConfig::new(3), &device);
    for step in 0..3 {
        let x0 = Tensor::<B, 4>::from_data(TensorData::new(values(4 * 64, 20 + step), [4, 1, 8, 8]), &device);
        let labels = Tensor::<B, 1, Int>::from_ints([0, 1, 2, 3], &device);
        trainer.step(x0, Some(labels));
    }
    let mut bits = Bits(Vec::new());
    trainer.model().visit(&mut bits);
    Module::<Flex>::visit(&trainer.ema().model, &mut bits);
    bits.0
}

/// `install_for_training` puts these kernels in the trainer's table for
/// Flex, and a trainer's weights and EMA after three steps have the same
/// bits with them as with the generic kernels. (The one test here that
/// uses the table, which is global: the others call the kernels directly.)
#[test]
fn a_trainer_with_these_kernels_takes_the_same_steps() {
    kernels::install::<Flex>(kernels::TrainKernels::default());
    let generic = three_trainer_steps();
    diffusion_flex_kernels::install_for_training();
    let installed = kernels::get::<Flex>();
    assert!(std::ptr::fn_addr_eq(
        installed.adam_step,
        optim::adam_step as AdamStepFn<Flex>
    ));
    assert!(std::ptr::fn_addr_eq(
        installed.blend,
        optim::blend as BlendFn<Flex>
    ));
    let fast = three_trainer_steps();
    assert_eq!(fast.len(), generic.len());
    let differ = fast.iter().zip(&generic).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} weights differ", fast.len());
}
