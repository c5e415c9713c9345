//! What the judge's verdicts add up to: accuracy per class and overall, the
//! confusion matrix, and the Fréchet distance of the samples' features to
//! a reference set's.

use burn::tensor::backend::Backend;
use diffusion_data::ImageSet;

use crate::frechet::{frechet_distance, Gaussian};
use crate::judge::{set_pixels, Judge};

/// How often the judge gave samples their intended class.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Share of all samples judged their intended class.
    pub accuracy: f64,
    /// The same per intended class (NaN for a class with no samples).
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[intended][judged]` counts (judged classes past the last
    /// are counted as the last).
    pub confusion: Vec<Vec<usize>>,
}

/// Scores `judged` against `intended` over `classes` classes.
pub fn score(intended: &[usize], judged: &[usize], classes: usize) -> Scores {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&l, &p) in intended.iter().zip(judged) {
        confusion[l.min(classes - 1)][p.min(classes - 1)] += 1;
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: usize = row.iter().sum();
            if total == 0 {
                f64::NAN
            } else {
                row[c] as f64 / total as f64
            }
        })
        .collect();
    Scores {
        accuracy: correct as f64 / intended.len().max(1) as f64,
        per_class_accuracy,
        confusion,
    }
}

/// The reference set's features as a Gaussian (the MNIST test set's in
/// `eval`), for Fréchet distances.
#[derive(Debug, Clone)]
pub struct Reference {
    gaussian: Gaussian,
    dim: usize,
    shape: [usize; 3],
}

impl Reference {
    /// The features of every image of `set` under `judge`.
    pub fn new<B: Backend>(judge: &Judge<B>, set: &ImageSet, device: &B::Device) -> Self {
        let shape = [1, set.height, set.width];
        let feats = judge.features(&set_pixels(set, set.len), shape, device);
        let dim = feats.len() / set.len.max(1);
        Self {
            gaussian: Gaussian::fit(&feats, dim),
            dim,
            shape,
        }
    }

    /// The Fréchet distance of features (`n × dim` values) to the reference.
    pub fn distance(&self, features: &[f32]) -> f64 {
        frechet_distance(&Gaussian::fit(features, self.dim), &self.gaussian)
    }

    /// The Fréchet distance of the first `n` images of `set` (real images,
    /// say the training set) to the reference: the best a model can score
    /// with `n` samples.
    pub fn floor<B: Backend>(&self, judge: &Judge<B>, set: &ImageSet, n: usize, device: &B::Device) -> f64 {
        let n = n.min(set.len);
        self.distance(&judge.features(&set_pixels(set, n), self.shape, device))
    }
}
