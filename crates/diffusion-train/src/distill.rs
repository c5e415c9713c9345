//! Progressive distillation (Salimans & Ho 2022): a student learns to take
//! in one deterministic DDIM step what its teacher takes in two, so each
//! stage halves the number of network evaluations. Classifier-free
//! guidance is folded into the student (Meng et al. 2023, with a fixed
//! weight): the teacher's two steps are guided, the student's one is plain
//! conditional, so a student of N steps costs N evaluations where its
//! guided teacher cost 2·2N.
//!
//! The student's timesteps are the trailing grid of N steps,
//! `t[i] = round(T·(N − i)/N)`; the teacher's are the trailing grid of 2N,
//! which holds every student timestep and one between each pair (trailing
//! grids nest). For a sample of clean data x0, noise ε and a student step
//! i, with z = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε:
//!
//! 1. the teacher takes two DDIM (η = 0) steps from z: t → t_mid → t_next,
//!    reaching z″ (with the sampler's clipping, exactly as `sample` would);
//! 2. the student's target x̃ is the clean image for which one DDIM step
//!    from z at t lands on z″:
//!    x̃ = (z″ − r·z) / (√ᾱ(t_next) − r·√ᾱ(t)), r = √(1−ᾱ(t_next)) / √(1−ᾱ(t))
//!    (x̃ = z″ when t_next = 0), and ε̃ = (z − √ᾱ(t)·x̃)/√(1−ᾱ(t));
//! 3. the student regresses on its own parameterisation of (x̃, ε̃): for v
//!    prediction the mean squared error in v, which weights the error in x
//!    by SNR + 1, as the paper does.
//!
//! A [`Trainer`](crate::Trainer) with a [`Teacher`] attached
//! ([`Trainer::with_teacher`](crate::Trainer::with_teacher)) trains this
//! way; everything else (checkpoints, exact resume, [`crate::Fit`]) is the
//! same as for ordinary training. Each batch is split into N contiguous
//! groups, one per student step, so every step trains every batch.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use diffusion_core::objective::TrainingBatch;
use diffusion_core::{
    BatchDenoiser, Clip, CoreError, Denoiser, Guided, Labels, NoiseSchedule, Prediction, SamplerConfig,
    SamplerKind, Spacing,
};

use crate::trainer::BatchPart;

/// What a student is trained on for one batch: its inputs and its
/// regression target, one per sample.
#[derive(Debug, Clone)]
pub struct Lesson<B: Backend> {
    /// The noisy images the student sees.
    pub x_t: Tensor<B, 4>,
    /// Their timesteps, `[B]`.
    pub t: Tensor<B, 1, Int>,
    /// Their labels.
    pub labels: Labels<B>,
    /// What the student should output for them.
    pub target: Tensor<B, 4>,
}

impl<B: Backend> Lesson<B> {
    /// Samples `[start, start + len)`.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Self {
            x_t: self.x_t.clone().narrow(0, start, len),
            t: self.t.clone().narrow(0, start, len),
            labels: self.labels.narrow(start, len),
            target: self.target.clone().narrow(0, start, len),
        }
    }

    /// The mean squared error of `student`'s output to the target.
    pub fn loss<M: BatchDenoiser<B> + ?Sized>(&self, student: &M) -> Tensor<B, 1> {
        let out = student.predict(self.x_t.clone(), self.t.clone(), self.labels.clone());
        (out - self.target.clone()).powi_scalar(2).mean()
    }
}

/// A model that teaches: turns a training batch (clean data, drawn noise,
/// labels) into a [`Lesson`] for a student predicting `student`.
pub trait Teacher<B: Backend>: Send {
    /// The lesson for `batch`, samples `[part.offset, part.offset + len)`
    /// of a global batch of `part.global`.
    fn lesson(&self, batch: TrainingBatch<B>, part: BatchPart, student: Prediction) -> Lesson<B>;
}

/// The lesson of `teacher` for an autodiff batch: computed on the inner
/// backend (no gradients through the teacher), returned on `B`.
pub(crate) fn lesson_on<B: AutodiffBackend>(
    teacher: &dyn Teacher<B::InnerBackend>,
    batch: &TrainingBatch<B>,
    part: BatchPart,
    student: Prediction,
) -> Lesson<B> {
    let labels = match &batch.labels {
        Labels::None => Labels::None,
        Labels::Classes(c) => Labels::Classes(c.clone().inner()),
        Labels::WithDropped(c) => Labels::WithDropped(c.clone().inner()),
    };
    let inner = TrainingBatch {
        x0: batch.x0.clone().inner(),
        t: batch.t.clone().inner(),
        eps: batch.eps.clone().inner(),
        labels,
    };
    let lesson = teacher.lesson(inner, part, student);
    Lesson {
        x_t: Tensor::from_inner(lesson.x_t),
        t: Tensor::from_inner(lesson.t),
        // The lesson keeps the batch's order, so its labels are the batch's.
        labels: batch.labels.clone(),
        target: Tensor::from_inner(lesson.target),
    }
}

/// Progressive distillation's teacher: a denoiser sampled with guided DDIM
/// (η = 0) on twice the student's steps.
#[derive(Debug, Clone)]
pub struct Progressive<D> {
    teacher: D,
    schedule: NoiseSchedule,
    /// The student's timesteps, N + 1 of them (from T down to 0).
    student: Vec<usize>,
    /// The teacher's timestep between `student[i]` and `student[i + 1]`.
    middle: Vec<usize>,
    guidance: f64,
    clip: Clip,
}

impl<D> Progressive<D> {
    /// A teacher for a student of `student_steps` steps: `teacher` samples
    /// with guidance `guidance` (1 = none) and x̂0 clipping `clip` (the
    /// student's sampler should clip alike). Refuses step counts whose
    /// teacher grid (2N steps) does not fit T.
    pub fn new(
        teacher: D,
        schedule: &NoiseSchedule,
        student_steps: usize,
        guidance: f64,
        clip: Clip,
    ) -> Result<Self, CoreError> {
        let big_t = schedule.num_steps();
        if student_steps == 0 || 2 * student_steps > big_t {
            return Err(CoreError::InvalidSampler(format!(
                "a distilled student needs 1..={} steps (its teacher takes twice as many of T = {big_t}), got {student_steps}",
                big_t / 2
            )));
        }
        if !(guidance.is_finite() && guidance >= 0.0) {
            return Err(CoreError::InvalidSampler(format!(
                "the teacher's guidance must be a number >= 0, got {guidance}"
            )));
        }
        let student = Spacing::Trailing.timesteps(big_t, student_steps)?;
        let teacher_grid = Spacing::Trailing.timesteps(big_t, 2 * student_steps)?;
        debug_assert!(student.iter().enumerate().all(|(i, &t)| teacher_grid[2 * i] == t));
        let middle = (0..student_steps).map(|i| teacher_grid[2 * i + 1]).collect();
        Ok(Self {
            teacher,
            schedule: schedule.clone(),
            student,
            middle,
            guidance,
            clip,
        })
    }

    /// The student's timesteps (N + 1, from T down to 0).
    pub fn student_timesteps(&self) -> &[usize] {
        &self.student
    }

    /// The teacher's two guided DDIM steps for student step `i`, from `z`.
    pub fn two_steps<B: Backend>(
        &self,
        i: usize,
        z: Tensor<B, 4>,
        classes: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 4>
    where
        D: Denoiser<B>,
    {
        let (t, mid, next) = (self.student[i], self.middle[i], self.student[i + 1]);
        let mut sampler = SamplerConfig::new(SamplerKind::Ddim { eta: 0.0 }, 2)
            .with_clip(self.clip)
            .build_with_timesteps::<B>(&self.schedule, vec![t, mid, next])
            .expect("the grid was checked when the teacher was made");
        let guided = Guided::new(&self.teacher, self.guidance);
        let prediction = guided.prediction();
        let out = guided.denoise(z.clone(), t, classes.clone());
        let z = sampler.step(0, z, out, prediction, None);
        let out = guided.denoise(z.clone(), mid, classes);
        sampler.step(1, z, out, prediction, None)
    }
}

/// The clean image x̃ for which one deterministic DDIM step from `z` at
/// ᾱ = `a_t` lands on `z_next` at ᾱ = `a_next` (> `a_t`).
pub fn one_step_target<B: Backend>(
    z: Tensor<B, 4>,
    z_next: Tensor<B, 4>,
    a_t: f64,
    a_next: f64,
) -> Tensor<B, 4> {
    let r = ((1.0 - a_next) / (1.0 - a_t)).sqrt();
    (z_next - z.mul_scalar(r)).div_scalar(a_next.sqrt() - r * a_t.sqrt())
}

impl<B: Backend, D: Denoiser<B> + Send> Teacher<B> for Progressive<D> {
    fn lesson(&self, batch: TrainingBatch<B>, part: BatchPart, student: Prediction) -> Lesson<B> {
        let n = batch.len();
        let steps = self.student.len() - 1;
        let classes = batch.labels.ids().cloned();
        let device = batch.x0.device();
        let (mut xs, mut ts, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..steps {
            // Student step i takes samples [i·G/N, (i+1)·G/N) of the
            // global batch; this part holds [offset, offset + n).
            let lo = (i * part.global / steps).max(part.offset);
            let hi = ((i + 1) * part.global / steps).min(part.offset + n);
            if lo >= hi {
                continue;
            }
            let (start, len) = (lo - part.offset, hi - lo);
            let (t, next) = (self.student[i], self.student[i + 1]);
            let (a_t, a_next) = (self.schedule.alpha_bar(t), self.schedule.alpha_bar(next));
            let x0 = batch.x0.clone().narrow(0, start, len);
            let eps = batch.eps.clone().narrow(0, start, len);
            let z = x0.mul_scalar(a_t.sqrt()) + eps.mul_scalar((1.0 - a_t).sqrt());
            let z_next = self.two_steps(i, z.clone(), classes.clone().map(|c| c.narrow(0, start, len)));
            let x_tilde = one_step_target(z.clone(), z_next, a_t, a_next);
            // (x̃, ε̃) at z, in the student's parameterisation.
            let estimate = Prediction::X0.to_estimate(z.clone(), x_tilde, a_t);
            targets.push(student.from_estimate(&estimate, a_t));
            xs.push(z);
            ts.push(Tensor::<B, 1, Int>::full([len], t as i64, &device));
        }
        Lesson {
            x_t: Tensor::cat(xs, 0),
            t: Tensor::cat(ts, 0),
            labels: batch.labels,
            target: Tensor::cat(targets, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    fn max_abs(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// One DDIM step from z with x̂0 = x̃ (and ε̂ from it) lands on z″, for
    /// a step into the middle of the schedule and for the last step to 0.
    #[test]
    fn one_step_from_the_target_lands_where_two_teacher_steps_did() {
        let device = Default::default();
        let s = NoiseSchedule::reference();
        for (t, next) in [(400, 200), (125, 0)] {
            let (a, an) = (s.alpha_bar(t), s.alpha_bar(next));
            let z = Tensor::<B, 4>::random([3, 1, 4, 4], Distribution::Normal(0.0, 1.0), &device);
            let z_next = Tensor::<B, 4>::random([3, 1, 4, 4], Distribution::Normal(0.0, 0.5), &device);
            let x = one_step_target(z.clone(), z_next.clone(), a, an);
            let eps = (z.clone() - x.clone().mul_scalar(a.sqrt())).div_scalar((1.0 - a).sqrt());
            let stepped = x.mul_scalar(an.sqrt()) + eps.mul_scalar((1.0 - an).sqrt());
            assert!(max_abs(stepped, z_next) < 1e-4, "t = {t} -> {next}");
        }
    }

    /// The student's grid is the trailing grid of N steps and the
    /// teacher's middles lie strictly between its neighbours: T = 500,
    /// N = 4 gives 500, 375, 250, 125, 0 with middles 438, 313, 188, 63
    /// (round half away from zero of 437.5, 312.5, 187.5, 62.5).
    #[test]
    fn the_grids_nest() {
        let s = NoiseSchedule::reference();
        let p = Progressive::new((), &s, 4, 1.0, Clip::Off).unwrap();
        assert_eq!(p.student_timesteps(), &[500, 375, 250, 125, 0]);
        assert_eq!(p.middle, vec![438, 313, 188, 63]);
        assert!(Progressive::new((), &s, 251, 1.0, Clip::Off).is_err());
        assert!(Progressive::new((), &s, 0, 1.0, Clip::Off).is_err());
        assert!(Progressive::new((), &s, 4, f64::NAN, Clip::Off).is_err());
    }

    /// A teacher that knows the data is one point x* (its exact ε
    /// prediction): every lesson's target for an x0-predicting student is
    /// x* itself. Checks the grouping too: sample j of a batch of 8 with N = 4 is at student
    /// step j div 2.
    #[test]
    fn a_teacher_that_knows_the_answer_teaches_it() {
        let device = Default::default();
        let s = NoiseSchedule::reference();
        let point = Tensor::<B, 4>::from_data(
            TensorData::new(vec![0.5f32, -0.25, 0.75, 0.0], [1, 1, 2, 2]),
            &device,
        );
        let exact = {
            let point = point.clone();
            let s = s.clone();
            move |x_t: Tensor<B, 4>, t: usize, _c: Option<Tensor<B, 1, Int>>| {
                let a = s.alpha_bar(t);
                let n = x_t.dims()[0];
                (x_t - point.clone().repeat_dim(0, n).mul_scalar(a.sqrt())).div_scalar((1.0 - a).sqrt())
            }
        };
        let teacher = Progressive::new(exact, &s, 4, 1.0, Clip::Off).unwrap();
        let x0 = point.clone().repeat_dim(0, 8);
        let eps = Tensor::<B, 4>::random([8, 1, 2, 2], Distribution::Normal(0.0, 1.0), &device);
        let batch = TrainingBatch {
            x0,
            t: Tensor::zeros([8], &device),
            eps,
            labels: Labels::None,
        };
        let lesson = teacher.lesson(batch.clone(), BatchPart { offset: 0, global: 8 }, Prediction::X0);
        let t: Vec<i64> = lesson.t.to_data().iter::<i64>().collect();
        assert_eq!(t, vec![500, 500, 375, 375, 250, 250, 125, 125]);
        assert!(max_abs(lesson.target, point.clone().repeat_dim(0, 8)) < 1e-3);

        // Samples 2..6 of the same global batch, as a replica holds them.
        let part = batch.narrow(2, 4);
        let lesson = teacher.lesson(part, BatchPart { offset: 2, global: 8 }, Prediction::X0);
        let t: Vec<i64> = lesson.t.to_data().iter::<i64>().collect();
        assert_eq!(t, vec![375, 375, 250, 250]);
    }
}
