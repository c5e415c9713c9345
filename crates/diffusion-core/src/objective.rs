//! The training objective: what a training step draws (per-sample t and ε,
//! dropped labels), what the network regresses on (ε, x0 or v), and how
//! the per-sample errors are weighted into one loss.
//!
//! For clean data x0, t uniform in 1..=T and ε ~ N(0, I), the network sees
//! x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε and is trained on the mean squared error
//! to its target (see [`Prediction::target`]), optionally weighted per
//! sample by Min-SNR-γ (Hang et al. 2023).
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::{Int, Tensor};
//! use diffusion_core::{objective::TrainingBatch, ForwardProcess, Labels, NoiseSchedule, Objective};
//!
//! type B = Flex; // training would use Autodiff<Flex>
//! let device = Default::default();
//! let schedule = NoiseSchedule::reference();
//! let fp = ForwardProcess::<B>::new(&schedule, &device);
//!
//! // Classifier-free guidance needs 10% of labels dropped.
//! let objective = Objective { label_dropout: 0.1, ..Objective::default() };
//! let x0 = Tensor::<B, 4>::zeros([8, 1, 28, 28], &device);
//! let labels = Tensor::<B, 1, Int>::arange(0..8, &device);
//! let batch: TrainingBatch<B> = objective.draw(x0, Some(labels), schedule.num_steps());
//! assert!(matches!(batch.labels, Labels::WithDropped(_)));
//! // A network that always predicts ε = 0 has a loss of about E[ε²] = 1.
//! let zero = |x: Tensor<B, 4>, _t: Tensor<B, 1, Int>, _l: Labels<B>| x.zeros_like();
//! let loss: f32 = objective.loss(&zero, &fp, batch).into_scalar();
//! assert!((loss - 1.0).abs() < 0.1);
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::denoiser::{BatchDenoiser, Labels};
use crate::forward::ForwardProcess;
use crate::guidance::NO_CLASS;
use crate::prediction::Prediction;

/// How the per-sample squared errors become one loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    /// The plain mean over every pixel of the batch (the reference).
    #[default]
    Uniform,
    /// Min-SNR-γ: each sample's mean error times min(SNR, γ) divided by the
    /// weight its target already gives t in terms of x0 error (SNR for ε,
    /// 1 for x0, SNR + 1 for v), SNR = ᾱ/(1 − ᾱ). γ = 5 in the paper.
    MinSnr {
        /// The clip γ (> 0).
        gamma: f64,
    },
}

/// The training objective of a denoiser.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Objective {
    /// Probability of replacing a sample's label by [`NO_CLASS`], so the
    /// model also learns the unconditional branch that classifier-free
    /// guidance needs (0 in the reference).
    pub label_dropout: f64,
    /// Per-sample weighting of the error.
    pub weighting: LossWeighting,
}

/// One training batch, noise and timesteps drawn.
#[derive(Debug, Clone)]
pub struct TrainingBatch<B: Backend> {
    /// Clean data, [B, C, H, W].
    pub x0: Tensor<B, 4>,
    /// One timestep per sample in 1..=T, `[B]`.
    pub t: Tensor<B, 1, Int>,
    /// The noise, shaped as `x0`.
    pub eps: Tensor<B, 4>,
    /// The labels after dropout.
    pub labels: Labels<B>,
}

impl<B: Backend> TrainingBatch<B> {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.x0.dims()[0]
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples `[start, start + len)` of the batch.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Self {
            x0: self.x0.clone().narrow(0, start, len),
            t: self.t.clone().narrow(0, start, len),
            eps: self.eps.clone().narrow(0, start, len),
            labels: self.labels.narrow(start, len),
        }
    }
}

/// `n` timesteps uniform in 1..=`num_steps`, drawn with the backend's
/// generator on the device.
pub fn draw_timesteps<B: Backend>(n: usize, num_steps: usize, device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), device)
        .mul_scalar(num_steps as f64)
        .int()
        .add_scalar(1)
        .clamp(1, num_steps as i64)
}

/// Replaces each label by [`NO_CLASS`] with probability `rate` (backend
/// generator).
pub fn drop_labels<B: Backend>(labels: Tensor<B, 1, Int>, rate: f64) -> Tensor<B, 1, Int> {
    let n = labels.dims()[0];
    let drop =
        Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), &labels.device()).lower_elem(rate);
    labels.mask_fill(drop, NO_CLASS)
}

/// Min-SNR-γ weights per sample (see [`LossWeighting::MinSnr`]).
///
/// # Shapes
/// - `alpha_bar`: [B, 1, 1, 1]; returns the same
pub fn min_snr_weight<B: Backend>(
    alpha_bar: Tensor<B, 4>,
    gamma: f64,
    prediction: Prediction,
) -> Tensor<B, 4> {
    let snr = alpha_bar.clone() / alpha_bar.neg().add_scalar(1.0).clamp_min(1e-12);
    let clipped = snr.clone().clamp_max(gamma);
    match prediction {
        Prediction::Epsilon => clipped / snr.clamp_min(1e-12),
        Prediction::X0 => clipped,
        Prediction::V => clipped / snr.add_scalar(1.0),
    }
}

impl Objective {
    /// Draws t, ε and the label drops for clean data `x0` (with the
    /// backend's generator, in that order: seed it for reproducible steps).
    pub fn draw<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        labels: Option<Tensor<B, 1, Int>>,
        num_steps: usize,
    ) -> TrainingBatch<B> {
        let n = x0.dims()[0];
        self.draw_part(x0, labels, num_steps, 0, n)
    }

    /// The draws of [`Objective::draw`] for a batch of `global` samples,
    /// of which `x0` (and `labels`) are samples `[offset, offset + len)`:
    /// t, ε and the label drops are drawn for the whole batch, in the same
    /// order as `draw`, and cut to this part. Data-parallel replicas that
    /// seed the generator alike therefore draw, between them, exactly what
    /// one device would for the whole batch.
    ///
    /// # Panics
    /// If the part does not fit in the batch.
    pub fn draw_part<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        labels: Option<Tensor<B, 1, Int>>,
        num_steps: usize,
        offset: usize,
        global: usize,
    ) -> TrainingBatch<B> {
        let device = x0.device();
        let [len, c, h, w] = x0.dims();
        assert!(
            offset + len <= global,
            "draw_part: samples {offset}..{} of {global}",
            offset + len
        );
        let part = len != global;
        let t = draw_timesteps::<B>(global, num_steps, &device);
        let eps = Tensor::<B, 4>::random([global, c, h, w], Distribution::Normal(0.0, 1.0), &device);
        let (t, eps) = if part {
            (t.narrow(0, offset, len), eps.narrow(0, offset, len))
        } else {
            (t, eps)
        };
        let labels = match labels {
            None => Labels::None,
            Some(l) if self.label_dropout > 0.0 => {
                let drop = Tensor::<B, 1>::random([global], Distribution::Uniform(0.0, 1.0), &device)
                    .lower_elem(self.label_dropout);
                let drop = if part { drop.narrow(0, offset, len) } else { drop };
                Labels::WithDropped(l.mask_fill(drop, NO_CLASS))
            }
            Some(l) => Labels::Classes(l),
        };
        TrainingBatch { x0, t, eps, labels }
    }

    /// The loss of `model` on a batch: the (weighted) mean squared error
    /// of its output to its target.
    pub fn loss<B: Backend, M: BatchDenoiser<B> + ?Sized>(
        &self,
        model: &M,
        fp: &ForwardProcess<B>,
        batch: TrainingBatch<B>,
    ) -> Tensor<B, 1> {
        let TrainingBatch { x0, t, eps, labels } = batch;
        let prediction = model.prediction();
        let x_t = fp.noise(x0.clone(), t.clone(), eps.clone());
        let output = model.predict(x_t, t.clone(), labels);
        let alpha_bar = fp.alpha_bar(t); // [B, 1, 1, 1]
        let target = prediction.target(x0, eps, alpha_bar.clone());
        match self.weighting {
            LossWeighting::Uniform => (output - target).powi_scalar(2).mean(),
            LossWeighting::MinSnr { gamma } => {
                let per_sample = (output - target).powi_scalar(2).mean_dims(&[1, 2, 3]); // [B, 1, 1, 1]
                (per_sample * min_snr_weight(alpha_bar, gamma, prediction)).mean()
            }
        }
    }
}

/// Functions `Fn(x_t, t, labels) -> ε̂` with per-sample t are denoisers
/// that predict ε.
impl<B, F> BatchDenoiser<B> for F
where
    B: Backend,
    F: Fn(Tensor<B, 4>, Tensor<B, 1, Int>, Labels<B>) -> Tensor<B, 4>,
{
    fn predict(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1, Int>, labels: Labels<B>) -> Tensor<B, 4> {
        self(x_t, t, labels)
    }

    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::NoiseSchedule;
    use crate::test_util::TestBackend as B;
    use burn::tensor::TensorData;

    /// The exact denoiser of data that is a single point c: given x_t and
    /// t it knows x0 = c, hence ε = (x_t − √ᾱ·c)/√(1−ᾱ), hence v.
    struct PointDenoiser {
        point: f32,
        fp: ForwardProcess<B>,
        prediction: Prediction,
    }

    impl BatchDenoiser<B> for PointDenoiser {
        fn predict(&self, x_t: Tensor<B, 4>, t: Tensor<B, 1, Int>, _: Labels<B>) -> Tensor<B, 4> {
            let ab = self.fp.alpha_bar(t);
            let x0 = x_t.zeros_like().add_scalar(self.point);
            let eps = (x_t - x0.clone() * ab.clone().sqrt()) / ab.clone().neg().add_scalar(1.0).sqrt();
            self.prediction.target(x0, eps, ab)
        }
        fn prediction(&self) -> Prediction {
            self.prediction
        }
    }

    fn ints(v: &Tensor<B, 1, Int>) -> Vec<i64> {
        v.to_data().convert::<i64>().to_vec::<i64>().unwrap()
    }

    #[test]
    fn the_exact_denoiser_of_a_point_has_zero_loss_for_every_objective() {
        let device = Default::default();
        let schedule = NoiseSchedule::reference();
        let fp = ForwardProcess::<B>::new(&schedule, &device);
        <B as Backend>::seed(&device, 3);
        for prediction in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
            for weighting in [LossWeighting::Uniform, LossWeighting::MinSnr { gamma: 5.0 }] {
                let objective = Objective {
                    label_dropout: 0.0,
                    weighting,
                };
                let x0 = Tensor::<B, 4>::full([64, 1, 4, 4], 0.7, &device);
                let batch = objective.draw(x0, None, 500);
                let model = PointDenoiser {
                    point: 0.7,
                    fp: fp.clone(),
                    prediction,
                };
                let loss: f32 = objective.loss(&model, &fp, batch.clone()).into_scalar();
                // f32 rounding only: ε̂ divides by √(1−ᾱ) ≥ √(1−ᾱ(1)) ≈ 0.03.
                assert!(loss < 1e-8, "{prediction:?} {weighting:?}: loss {loss}");
                // A denoiser aimed at another point is penalised.
                let wrong = PointDenoiser { point: 0.2, ..model };
                let off: f32 = objective.loss(&wrong, &fp, batch).into_scalar();
                assert!(off > 1e-3, "{prediction:?} {weighting:?}: {off}");
            }
        }
    }

    #[test]
    fn min_snr_weights_match_their_closed_forms() {
        // ᾱ = 0.8, 0.5, 0.9 → SNR = 4, 1, 9; γ = 5 clips the last to 5.
        let device = Default::default();
        let ab = Tensor::<B, 4>::from_data(TensorData::new(vec![0.8f32, 0.5, 0.9], [3, 1, 1, 1]), &device);
        let cases = [
            (Prediction::Epsilon, [1.0, 1.0, 5.0 / 9.0]), // min(SNR, γ)/SNR
            (Prediction::X0, [4.0, 1.0, 5.0]),            // min(SNR, γ)
            (Prediction::V, [4.0 / 5.0, 1.0 / 2.0, 5.0 / 10.0]), // min(SNR, γ)/(SNR + 1)
        ];
        for (p, expect) in cases {
            let w = min_snr_weight(ab.clone(), 5.0, p)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            for (got, want) in w.iter().zip(expect) {
                assert!((got - want as f32).abs() < 1e-5, "{p:?}: {w:?} vs {expect:?}");
            }
        }
    }

    #[test]
    fn label_dropout_rate_is_within_sampling_error() {
        let device = Default::default();
        <B as Backend>::seed(&device, 11);
        let n = 100_000;
        let labels = Tensor::<B, 1, Int>::arange(0..n as i64, &device).remainder_scalar(10);
        let dropped = ints(&drop_labels(labels.clone(), 0.1));
        let kept = ints(&labels);
        let count = dropped.iter().filter(|&&c| c == NO_CLASS).count();
        // Binomial(1e5, 0.1): sd = √(1e5·0.1·0.9) ≈ 95, so ±500 is > 5 sd.
        assert!((9_500..10_500).contains(&count), "{count} dropped");
        // Labels that are not dropped are untouched.
        assert!(dropped.iter().zip(&kept).all(|(d, k)| *d == NO_CLASS || d == k));
    }

    #[test]
    fn timesteps_cover_one_to_t_uniformly() {
        let device = Default::default();
        <B as Backend>::seed(&device, 5);
        let (n, big_t) = (100_000, 10);
        let t = ints(&draw_timesteps::<B>(n, big_t, &device));
        let mut counts = [0usize; 11];
        for v in t {
            assert!((1..=big_t as i64).contains(&v), "t = {v}");
            counts[v as usize] += 1;
        }
        // Each of 1..=10 has Binomial(1e5, 0.1): ±500 is > 5 sd.
        for c in &counts[1..] {
            assert!((9_500..10_500).contains(c), "{counts:?}");
        }
    }
}
