//! The digit classifier that judges samples: where its weights live, and
//! `diffusion classifier`, which trains it (loading and judging are
//! `diffusion_eval::judge`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use diffusion_data::{BatchLoader, DatasetName, ImageSet, Split};
use diffusion_eval::judge::{classify, set_pixels, INFO, WEIGHTS};
use diffusion_eval::ClassifierInfo;
use diffusion_model::{Classifier, ClassifierConfig};

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint::save_module;
use crate::fsutil::write_bytes_atomically;
use crate::{data, progress};

/// `data/classifier`, where the committed classifier lives.
pub fn default_dir() -> PathBuf {
    data::repo_data_dir().join("classifier")
}

/// `diffusion classifier` flags.
#[derive(Debug, clap::Args)]
pub struct ClassifierArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write lenet.mpk and lenet.json (default: data/classifier).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Folder with the MNIST IDX files (default: the bundled MNIST).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

pub fn train(args: ClassifierArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    if args.epochs == 0 || args.batch == 0 {
        bail!("--epochs and --batch must be at least 1");
    }
    let train = data::load(DatasetName::Mnist, args.data_dir.as_deref(), Split::Train)?;
    let test = data::load(DatasetName::Mnist, args.data_dir.as_deref(), Split::Test)?;
    let out = args.out.clone().unwrap_or_else(default_dir);
    dispatch(
        backend,
        TrainClassifier {
            args,
            train: Arc::new(train),
            test,
            out,
        },
    )
}

struct TrainClassifier {
    args: ClassifierArgs,
    train: Arc<ImageSet>,
    test: ImageSet,
    out: PathBuf,
}

impl Task for TrainClassifier {
    type Output = i32;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<i32> {
        let TrainClassifier {
            args,
            train,
            test,
            out,
        } = self;
        B::seed(&device, args.seed);
        let config = ClassifierConfig::new().with_num_classes(train.num_classes.max(10));
        let mut model: Classifier<B> = config.init(&device);
        let mut optim = AdamConfig::new().with_epsilon(1e-8).init::<B, Classifier<B>>();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let loader = BatchLoader::new(train.clone(), args.batch, args.seed, 2);
        let mut accuracy = 0.0;
        for epoch in 0..args.epochs {
            let bar = progress::bar(loader.batches_per_epoch() as u64, "batches");
            for host in loader.epoch(epoch as u64, 0) {
                let batch = host.into_device::<B>(&device);
                let logits = model.forward(batch.images);
                let loss = loss_fn.forward(logits, batch.labels);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                // Step decay: the last epoch at a tenth of the rate.
                let lr = if epoch + 1 == args.epochs && args.epochs > 1 {
                    args.lr * 0.1
                } else {
                    args.lr
                };
                model = optim.step(lr, model, grads);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let valid = model.valid();
            let pixels = set_pixels(&test, test.len);
            let (preds, _) = classify(&valid, &pixels, [1, test.height, test.width], 500, &device);
            let correct = preds
                .iter()
                .zip(&test.labels)
                .filter(|(p, l)| **p == **l as usize)
                .count();
            accuracy = correct as f64 / test.len as f64;
            eprintln!(
                "epoch {}/{}: test accuracy {:.2}%",
                epoch + 1,
                args.epochs,
                100.0 * accuracy
            );
        }
        let info = ClassifierInfo {
            config,
            dataset: DatasetName::Mnist,
            test_accuracy: accuracy,
            epochs: args.epochs,
            seed: args.seed,
            command: format!(
                "cargo xtask classifier --epochs {} --batch {} --lr {} --seed {}",
                args.epochs, args.batch, args.lr, args.seed
            ),
        };
        // Weights under a temporary name, then renamed; the info last.
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        // (burn's recorder replaces the extension, so the temporary name has no dot.)
        save_module(model.valid(), &out.join(format!("{WEIGHTS}-partial")))?;
        std::fs::rename(
            out.join(format!("{WEIGHTS}-partial.mpk")),
            out.join(format!("{WEIGHTS}.mpk")),
        )?;
        write_bytes_atomically(&out.join(INFO), serde_json::to_string_pretty(&info)?.as_bytes())?;
        say!("test accuracy {:.2}%; wrote {}", 100.0 * accuracy, out.display());
        if accuracy < 0.99 {
            eprintln!("warning: below the 99% the evaluation protocol asks of its judge; train longer");
        }
        Ok(0)
    }
}
