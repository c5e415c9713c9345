//! The digit classifier that judges samples: loading it, and its
//! predictions and penultimate features for a batch of images.

use std::path::Path;
use std::sync::Arc;

use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use diffusion_data::{BatchLoader, DatasetName, ImageSet};
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

    /// Writes the judge into `dir` as [`Judge::load`] reads it: the
    /// weights under a temporary name, then renamed, and the info last
    /// (atomically), so a kill leaves no judge that looks complete.
    pub fn save(&self, dir: &Path) -> Result<(), EvalError> {
        let write = |path: &Path, e: &dyn std::fmt::Display| EvalError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| write(dir, &e))?;
        // (burn's recorder replaces the extension: the temporary name has no dot.)
        let partial = dir.join(format!("{WEIGHTS}-partial"));
        diffusion_train::checkpoint::save_module(self.model.clone(), &partial)
            .map_err(|e| write(&partial.with_extension("mpk"), &e))?;
        let weights = dir.join(format!("{WEIGHTS}.mpk"));
        std::fs::rename(partial.with_extension("mpk"), &weights).map_err(|e| write(&weights, &e))?;
        let info = dir.join(INFO);
        let text = serde_json::to_string_pretty(&self.info).map_err(|e| write(&info, &e))?;
        diffusion_train::atomic::write_bytes_atomically(&info, text.as_bytes()).map_err(|e| write(&info, &e))
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

/// How [`train_judge`] trains the classifier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JudgeTraining {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Adam's learning rate (a tenth of it in the last epoch).
    pub lr: f64,
    /// Seed of the initialisation and the batch order.
    pub seed: u64,
}

/// Trains the LeNet judge on `train` with Adam and cross-entropy, a step
/// decay to a tenth in the last epoch, and measures its accuracy on `test`
/// after every epoch (`on_epoch(epoch, accuracy)`; `on_batch` after every
/// step). Returns the judge, its `info` naming `command` as how it was made.
pub fn train_judge<B: AutodiffBackend>(
    train: Arc<ImageSet>,
    test: &ImageSet,
    how: JudgeTraining,
    command: String,
    device: &B::Device,
    on_batch: &dyn Fn(),
    on_epoch: &mut dyn FnMut(usize, f64),
) -> Result<Judge<B::InnerBackend>, EvalError> {
    if how.epochs == 0 || how.batch == 0 {
        return Err(EvalError::Invalid(
            "the judge needs at least 1 epoch and a batch of at least 1".into(),
        ));
    }
    B::seed(device, how.seed);
    let config = ClassifierConfig::new().with_num_classes(train.num_classes.max(10));
    let mut model: Classifier<B> = config.init(device);
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init::<B, Classifier<B>>();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let loader = BatchLoader::new(train.clone(), how.batch, how.seed, 2);
    let mut accuracy = 0.0;
    let pixels = set_pixels(test, test.len);
    for epoch in 0..how.epochs {
        // Step decay: the last epoch at a tenth of the rate.
        let lr = if epoch + 1 == how.epochs && how.epochs > 1 {
            how.lr * 0.1
        } else {
            how.lr
        };
        for host in loader.epoch(epoch as u64, 0) {
            let batch = host.into_device::<B>(device);
            let logits = model.forward(batch.images);
            let loss = loss_fn.forward(logits, batch.labels);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            on_batch();
        }
        let valid = model.valid();
        let (preds, _) = classify(&valid, &pixels, [1, test.height, test.width], 500, device);
        let correct = preds
            .iter()
            .zip(&test.labels)
            .filter(|(p, l)| **p == **l as usize)
            .count();
        accuracy = correct as f64 / test.len as f64;
        on_epoch(epoch, accuracy);
    }
    let info = ClassifierInfo {
        config,
        dataset: DatasetName::Mnist,
        test_accuracy: accuracy,
        epochs: how.epochs,
        seed: how.seed,
        command,
    };
    Ok(Judge {
        model: model.valid(),
        info,
    })
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
