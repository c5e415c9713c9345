//! Progressive distillation on the tiny U-Net: a stage of training brings
//! the student's one step closer to its teacher's two guided steps.

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_core::objective::TrainingBatch;
use diffusion_core::{Clip, Labels, NoiseSchedule, Prediction};
use diffusion_model::{UNet, UNetConfig};
use diffusion_train::distill::{Progressive, Teacher};
use diffusion_train::{BatchPart, Trainer, TrainerConfig};

type B = Autodiff<Flex>;
type Inner = Flex;

fn images(n: usize, device: &burn::tensor::Device<Inner>) -> (Tensor<Inner, 4>, Tensor<Inner, 1, Int>) {
    let x0 = Tensor::<Inner, 4>::random([n, 1, 28, 28], Distribution::Uniform(-1.0, 1.0), device);
    let labels = Tensor::<Inner, 1, Int>::arange(0..n as i64, device).remainder_scalar(10);
    (x0, labels)
}

#[test]
fn a_distillation_stage_brings_the_student_closer_to_its_teachers_two_steps() {
    let device = Default::default();
    let schedule = NoiseSchedule::reference();
    let config = UNetConfig::tiny().with_prediction(Prediction::V);
    // Any deterministic network can teach: the tiny U-Net from seed 3,
    // guided with w = 2. The student starts from the same weights.
    let student: UNet<B> = config.init_seeded::<B>(&device, 3).unwrap();
    let teacher: UNet<Inner> = student.valid();
    let progressive = Progressive::new(teacher, &schedule, 2, 2.0, Clip::Range(-1.0, 1.0)).unwrap();

    // The yardstick: the student's mean squared error to the teacher's
    // two-step targets on 16 held-out images and noises (in v, what the
    // student predicts).
    let (x0, labels) = images(16, &device);
    let held_out = TrainingBatch {
        eps: x0.random_like(Distribution::Normal(0.0, 1.0)),
        t: Tensor::zeros([16], &device),
        labels: Labels::Classes(labels),
        x0,
    };
    let lesson = progressive.lesson(
        held_out,
        BatchPart {
            offset: 0,
            global: 16,
        },
        Prediction::V,
    );
    let distance = |student: &UNet<Inner>| -> f32 { lesson.loss(student).into_scalar() };
    let before = distance(&student.valid());

    let steps = 60;
    let trainer_config = TrainerConfig {
        lr: 2e-3,
        ..TrainerConfig::new(steps)
    };
    let mut trainer = Trainer::new(student, &schedule, trainer_config, &device).with_teacher(progressive);
    let (pool, pool_labels) = images(64, &device);
    for k in 0..steps as usize {
        let start = (k * 16) % 64;
        let x0 = Tensor::<B, 4>::from_inner(pool.clone().narrow(0, start, 16));
        let labels = Tensor::<B, 1, Int>::from_inner(pool_labels.clone().narrow(0, start, 16));
        let out = trainer.step(x0, Some(labels));
        assert!(out.loss.into_scalar().is_finite());
    }
    let after = distance(&trainer.model().valid());
    eprintln!("distance to the teacher's two steps: {before:.5} before, {after:.5} after {steps} steps");
    assert!(before > 1e-3, "the untrained student already matches: {before}");
    assert!(after < 0.5 * before, "{before} -> {after}");
}
