//! The digit classifier that judges samples: loading it, and its
//! predictions and penultimate features for a batch of images.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use diffusion_data::{DatasetName, ImageSet};
use diffusion_model::{Classifier, ClassifierConfig};
use diffusion_train::checkpoint::Recorder;
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// What is saved beside the classifier's weights (`lenet.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// The network.
    pub config: ClassifierConfig,
    /// The data it was trained on.
    pub dataset: DatasetName,
    /// Its accuracy on that data's test set.
    pub test_accuracy: f64,
    /// Epochs it was trained.
    pub epochs: usize,
    /// Seed of its training.
    pub seed: u64,
    /// The command that reproduces the weights.
    pub command: String,
}

/// The weights' file stem in a classifier folder (`lenet.mpk`).
pub const WEIGHTS: &str = "lenet";
/// The description's file name in a classifier folder.
pub const INFO: &str = "lenet.json";

/// A loaded classifier and what is known of it.
#[derive(Debug)]
pub struct Judge<B: Backend> {
    /// The network.
    pub model: Classifier<B>,
    /// Its description.
    pub info: ClassifierInfo,
}

impl<B: Backend> Judge<B> {
    /// Loads the classifier saved in `dir` (`lenet.mpk` and `lenet.json`).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, EvalError> {
        let info_path = dir.join(INFO);
        let retrain = "train one with `cargo xtask classifier`";
        let text = std::fs::read_to_string(&info_path).map_err(|e| EvalError::Classifier {
            path: info_path.clone(),
            reason: format!("no classifier here ({e}); {retrain}"),
        })?;
        let info: ClassifierInfo = serde_json::from_str(&text).map_err(|e| EvalError::Classifier {
            path: info_path.clone(),
            reason: format!("corrupt classifier info ({e}); {retrain}"),
        })?;
        let file = dir.join(WEIGHTS);
        let model = info
            .config
            .init::<B>(device)
            .load_file(file.clone(), &Recorder::new(), device)
            .map_err(|e| EvalError::Classifier {
                path: file.with_extension("mpk"),
                reason: format!("cannot load the classifier ({e}); re{retrain}"),
            })?;
        Ok(Self { model, info })
    }

    /// Classifies `images` in batches of `batch` (see [`classify`]).
    pub fn classify(
        &self,
        images: &[f32],
        shape: [usize; 3],
        batch: usize,
        device: &B::Device,
    ) -> (Vec<usize>, Vec<f32>) {
        classify(&self.model, images, shape, batch, device)
    }

    /// The penultimate features of `images` (see [`Judge::classify`]).
    pub fn features(&self, images: &[f32], shape: [usize; 3], device: &B::Device) -> Vec<f32> {
        self.classify(images, shape, 500, device).1
    }
}

/// Classifies `images` (`[n, c, h, w]` values in [−1, 1], row-major;
/// `shape` is `[c, h, w]`) with `model` in batches of `batch`: the
/// predicted class and the penultimate features of each image (n × feature
/// dim values).
pub fn classify<B: Backend>(
    model: &Classifier<B>,
    images: &[f32],
    shape: [usize; 3],
    batch: usize,
    device: &B::Device,
) -> (Vec<usize>, Vec<f32>) {
    let per = shape.iter().product::<usize>();
    let n = images.len() / per;
    let mut preds = Vec::with_capacity(n);
    let mut feats = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let m = batch.max(1).min(n - start);
        let data = TensorData::new(
            images[start * per..(start + m) * per].to_vec(),
            [m, shape[0], shape[1], shape[2]],
        );
        let f = model.features(Tensor::<B, 4>::from_data(data, device));
        let logits = model.logits_from_features(f.clone());
        let p = logits.argmax(1).into_data().convert::<i64>().to_vec::<i64>();
        preds.extend(p.unwrap_or_default().into_iter().map(|v| v as usize));
        feats.extend(host_values(f));
    }
    (preds, feats)
}

/// The first `n` images of an [`ImageSet`] as [−1, 1] floats.
pub fn set_pixels(set: &ImageSet, n: usize) -> Vec<f32> {
    let per = set.height * set.width;
    set.images[..n.min(set.len) * per]
        .iter()
        .map(|&p| diffusion_data::batch::scale_pixel(p))
        .collect()
}

/// A tensor's values on the host as f32 (waits for the device).
pub fn host_values<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data after convert")
}
