//! The digit classifier that judges samples: where its weights live, and
//! `diffusion classifier`, which trains it (loading and judging are
//! `diffusion_eval::judge`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use diffusion_data::{DatasetName, ImageSet, Split};
use diffusion_eval::judge::{train_judge, JudgeTraining};

use crate::backend::{dispatch, BackendKind, Task};
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
        let how = JudgeTraining {
            epochs: args.epochs,
            batch: args.batch,
            lr: args.lr,
            seed: args.seed,
        };
        let command = format!(
            "cargo xtask classifier --epochs {} --batch {} --lr {} --seed {}",
            args.epochs, args.batch, args.lr, args.seed
        );
        let per_epoch = (train.len / args.batch) as u64;
        let bar = std::cell::RefCell::new(progress::bar(per_epoch, "batches"));
        let judge = train_judge::<B>(
            train,
            &test,
            how,
            command,
            &device,
            &|| bar.borrow().inc(1),
            &mut |epoch, accuracy| {
                bar.borrow().finish_and_clear();
                eprintln!(
                    "epoch {}/{}: test accuracy {:.2}%",
                    epoch + 1,
                    args.epochs,
                    100.0 * accuracy
                );
                if epoch + 1 < args.epochs {
                    *bar.borrow_mut() = progress::bar(per_epoch, "batches");
                }
            },
        )?;
        judge.save(&out)?;
        let accuracy = judge.info.test_accuracy;
        say!("test accuracy {:.2}%; wrote {}", 100.0 * accuracy, out.display());
        if accuracy < 0.99 {
            eprintln!("warning: below the 99% the evaluation protocol asks of its judge; train longer");
        }
        Ok(0)
    }
}
