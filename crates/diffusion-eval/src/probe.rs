//! A small evaluation to run during training (after each epoch): a few
//! samples per class drawn with fixed noise, judged as `eval` judges.

use burn::tensor::backend::Backend;
use diffusion_core::{Denoiser, NoiseSchedule};
use diffusion_data::ImageSet;

use crate::generate::{generate, Generation};
use crate::judge::Judge;
use crate::score::{score, Reference};
use crate::EvalError;

/// What a [`Probe`] measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeResult {
    /// Share of samples the classifier gives their own class.
    pub accuracy: f64,
    /// Fréchet distance of the samples' classifier features to the reference set.
    pub frechet: f64,
}

/// `per_class` samples of each of 10 classes, judged against a reference
/// set whose features are computed once.
#[derive(Debug)]
pub struct Probe<B: Backend> {
    judge: Judge<B>,
    reference: Reference,
    /// Fréchet distance of as many real images (`floor_set`) as the probe
    /// draws, to the reference: the best a model can score at this count.
    pub floor: f64,
    labels: Vec<usize>,
    how: Generation,
    shape: [usize; 3],
}

impl<B: Backend> Probe<B> {
    /// A probe of `per_class` samples a class drawn as `how` says (its
    /// `batch` is ignored: the samples are split evenly over its threads),
    /// judged by `judge` against `reference_set` (the test set), with the
    /// floor taken from `floor_set` (the training set).
    pub fn new(
        judge: Judge<B>,
        reference_set: &ImageSet,
        floor_set: &ImageSet,
        per_class: usize,
        how: Generation,
        device: &B::Device,
    ) -> Self {
        let labels: Vec<usize> = (0..10).flat_map(|c| std::iter::repeat_n(c, per_class)).collect();
        let reference = Reference::new(&judge, reference_set, device);
        let floor = reference.floor(&judge, floor_set, labels.len(), device);
        let batch = labels.len().div_ceil(how.threads.max(1)).max(1);
        Self {
            judge,
            reference,
            floor,
            labels,
            how: Generation { batch, ..how },
            shape: [1, reference_set.height, reference_set.width],
        }
    }

    /// Samples and judges `model`'s digits (the same noise every time).
    pub fn measure<D>(
        &self,
        model: &D,
        schedule: &NoiseSchedule,
        device: &B::Device,
    ) -> Result<ProbeResult, EvalError>
    where
        D: Denoiser<B> + Clone + Send,
    {
        let images = generate(
            model,
            schedule,
            &self.how,
            &self.labels,
            self.shape,
            device,
            &|_| {},
        )?;
        let (preds, feats) = self.judge.classify(&images, self.shape, 500, device);
        Ok(ProbeResult {
            accuracy: score(&self.labels, &preds, 10).accuracy,
            frechet: self.reference.distance(&feats),
        })
    }
}
