//! `diffusion eval`: sample-quality numbers a reader can trust.
//!
//! The judge is the project's MNIST classifier (data/classifier). For the
//! generated images it reports conditional accuracy (overall, per class, and
//! the confusion matrix) and the Fréchet distance between the classifier's
//! penultimate features of the generated images and of the 10,000 test
//! images; beside it the same distance for as many training images (the
//! floor) and for as many pure-noise images (the ceiling).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use diffusion_core::{SamplerConfig, SamplerKind};
use diffusion_data::{DatasetName, Split};
use diffusion_eval::judge::host_values;
use diffusion_eval::{generate, score, Generation, Judge, Probe, Reference};
use diffusion_train::Run;
use serde::Serialize;

use crate::backend::sampling_threads;
use crate::backend::{dispatch, BackendKind, Task};
use crate::config::{RunConfig, SamplingFlags, Weights};
use crate::fsutil::write_bytes_atomically;
use crate::{data, judge, npy, progress};

/// `diffusion eval` flags.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Run directory to evaluate (or use --npy and --labels).
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "npy")]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Images generated per class.
    #[arg(long, default_value_t = 1000)]
    pub per_class: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per sampling batch.
    #[arg(long, default_value_t = 250)]
    pub batch: usize,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Judge images made elsewhere: a .npy of f32 [n, 1, 28, 28] in [-1, 1] ...
    #[arg(long, requires = "labels", conflicts_with = "checkpoint")]
    pub npy: Option<PathBuf>,
    /// ... and a .npy of their n intended classes.
    #[arg(long, requires = "npy")]
    pub labels: Option<PathBuf>,
    /// Folder of the judge (default: data/classifier).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Folder with the MNIST IDX files (default: the bundled MNIST).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What `eval` reports (also written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub sampler: Option<SamplerConfig>,
    pub guidance: f64,
    pub weights: Option<Weights>,
    pub samples: usize,
    pub seed: u64,
    pub wall_time_s: f64,
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[intended][predicted]`: how many digits asked for as `intended` were judged `predicted`.
    pub confusion: Vec<Vec<usize>>,
    pub frechet: f64,
    pub frechet_floor_train_vs_test: f64,
    pub frechet_ceiling_noise_vs_test: f64,
    pub classifier_test_accuracy: f64,
}

pub fn run(args: EvalArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    if args.per_class == 0 || args.batch == 0 || args.per_class > 10_000 {
        bail!("--per-class must be in 1..=10000 and --batch at least 1");
    }
    let source = match (&args.checkpoint, &args.npy, &args.labels) {
        (Some(dir), _, _) => run_source(dir, &args)?,
        (None, Some(images), Some(labels)) => file_source(images, labels)?,
        _ => bail!("give --checkpoint RUN_DIR, or --npy FILE with --labels FILE"),
    };
    let classifier_dir = args.classifier.clone().unwrap_or_else(judge::default_dir);
    let test = data::load(DatasetName::Mnist, args.data_dir.as_deref(), Split::Test)?;
    let train = data::load(DatasetName::Mnist, args.data_dir.as_deref(), Split::Train)?;
    let task = EvalTask {
        args,
        cpu: backend.is_cpu(),
        source,
        classifier_dir,
        test,
        train,
    };
    dispatch(backend, task)
}

/// A run to sample from, with the sampling flags applied.
fn run_source(dir: &Path, args: &EvalArgs) -> Result<Source> {
    let run = Run::open(dir)?;
    let config = &run.config;
    if config.model.image_channels != 1 || config.model.image_size != 28 {
        bail!(
            "eval judges 1x28x28 digits; this run makes {}x{}x{}",
            config.model.image_channels,
            config.model.image_size,
            config.model.image_size
        );
    }
    if config.model.num_classes.is_none() {
        bail!("eval measures conditional accuracy; this run's model is unconditional");
    }
    let guidance = args.sampling.guidance(config)?;
    let sampler = args.sampling.sampler(config)?;
    let weights = args.sampling.weights(config);
    Ok(Source::Run {
        run: Box::new(run),
        sampler,
        weights,
        guidance,
    })
}

/// Images and labels from .npy files, checked.
fn file_source(images: &Path, labels: &Path) -> Result<Source> {
    let a = npy::read(images)?;
    if a.shape.len() != 4 || a.shape[1..] != [1, 28, 28] {
        bail!(
            "{}: shape {:?}; eval needs [n, 1, 28, 28]",
            images.display(),
            a.shape
        );
    }
    if a.shape[0] < 2 {
        bail!(
            "{}: {} image(s); the Fréchet distance needs at least 2 (use a few hundred for a meaningful one)",
            images.display(),
            a.shape[0]
        );
    }
    if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: image {} holds a non-finite value ({}); eval judges finite pixels in [-1, 1]",
            images.display(),
            i / 784,
            a.data[i]
        );
    }
    let l = npy::read(labels)?;
    if l.shape.len() != 1 {
        bail!(
            "{}: shape {:?}; labels must be one-dimensional, [n]",
            labels.display(),
            l.shape
        );
    }
    if l.data.len() != a.shape[0] {
        bail!(
            "{}: {} labels for {} images",
            labels.display(),
            l.data.len(),
            a.shape[0]
        );
    }
    let labels: Vec<usize> = l
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_finite() && v.fract() == 0.0 && (0.0..10.0).contains(&v) {
                Ok(v as usize)
            } else {
                Err(anyhow::anyhow!(
                    "{}: label {i} is {v}, not a digit class 0..9",
                    labels.display()
                ))
            }
        })
        .collect::<Result<_>>()?;
    Ok(Source::Files {
        name: images.display().to_string(),
        images: a.data,
        labels,
    })
}

enum Source {
    Run {
        run: Box<Run>,
        sampler: SamplerConfig,
        weights: Weights,
        guidance: f64,
    },
    Files {
        name: String,
        images: Vec<f32>,
        labels: Vec<usize>,
    },
}

struct EvalTask {
    args: EvalArgs,
    /// Whether the backend is the CPU one (batches run in parallel threads).
    cpu: bool,
    source: Source,
    classifier_dir: PathBuf,
    test: diffusion_data::ImageSet,
    train: diffusion_data::ImageSet,
}

impl Task for EvalTask {
    type Output = i32;

    fn run<AB: AutodiffBackend>(self, device: AB::Device) -> Result<i32> {
        type B<AB> = <AB as AutodiffBackend>::InnerBackend;
        let EvalTask {
            args,
            cpu,
            source,
            classifier_dir,
            test,
            train,
        } = self;
        let judge = Judge::<B<AB>>::load(&classifier_dir, &device)?;
        let started = Instant::now();
        let shape = [1, 28, 28];
        let mut guidance = 1.0;
        let (images, labels, name, sampler, weights) = match source {
            Source::Run {
                run,
                sampler,
                weights,
                guidance: w,
            } => {
                guidance = w;
                let model = run.model::<B<AB>>(weights, &device)?;
                let schedule = run.noise_schedule()?;
                let labels: Vec<usize> = (0..10)
                    .flat_map(|c| std::iter::repeat_n(c, args.per_class))
                    .collect();
                let how = Generation {
                    sampler: sampler.clone(),
                    guidance,
                    batch: args.batch,
                    seed: args.seed,
                    threads: sampling_threads(cpu),
                };
                let bar = progress::bar(labels.len() as u64, "images");
                let images = generate(&model, &schedule, &how, &labels, shape, &device, &|n| {
                    bar.inc(n as u64)
                })?;
                bar.finish_and_clear();
                let name = run.dir.display().to_string();
                (images, labels, name, Some(sampler), Some(weights))
            }
            Source::Files { name, images, labels } => (images, labels, name, None, None),
        };
        let n = labels.len();
        let (preds, feats) = judge.classify(&images, shape, 500, &device);
        let scores = score(&labels, &preds, 10);
        let reference = Reference::new(&judge, &test, &device);
        B::<AB>::seed(&device, args.seed ^ 0xC0FFEE);
        let noise = Tensor::<B<AB>, 4>::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device)
            .clamp(-1.0, 1.0);
        let noise = host_values(noise);
        let report = Report {
            source: name,
            sampler,
            guidance,
            weights,
            samples: n,
            seed: args.seed,
            wall_time_s: started.elapsed().as_secs_f64(),
            accuracy: scores.accuracy,
            per_class_accuracy: scores.per_class_accuracy,
            confusion: scores.confusion,
            frechet: reference.distance(&feats),
            frechet_floor_train_vs_test: reference.floor(&judge, &train, n, &device),
            frechet_ceiling_noise_vs_test: reference.distance(&judge.features(&noise, shape, &device)),
            classifier_test_accuracy: judge.info.test_accuracy,
        };
        let json = serde_json::to_string_pretty(&report)?;
        if let Some(dir) = &args.checkpoint {
            let file = dir.join("eval").join(report_name(&report));
            write_bytes_atomically(&file, json.as_bytes())?;
            eprintln!("wrote {}", file.display());
        }
        if args.json {
            say!("{json}");
        } else {
            print_table(&report);
        }
        Ok(0)
    }
}

/// The file name of a run's evaluation: every setting that changes the
/// samples is in it, so evaluations of one run with other settings do not
/// overwrite each other.
fn report_name(report: &Report) -> String {
    let s = report.sampler.as_ref().expect("a run has a sampler");
    let eta = match s.kind {
        SamplerKind::Reference { eta } | SamplerKind::Ddim { eta } => format!("-eta{eta}"),
        _ => String::new(),
    };
    let kind = format!("{:?}", s.kind)
        .split([' ', '{'])
        .next()
        .unwrap_or("sampler")
        .to_lowercase();
    let weights = report.weights.map_or("samples", Weights::file);
    format!(
        "{kind}-{}{eta}-w{}-{weights}-n{}-seed{}.json",
        s.steps, report.guidance, report.samples, report.seed
    )
}

fn print_table(r: &Report) {
    say!("source      {}", r.source);
    if let Some(s) = &r.sampler {
        say!(
            "sampler     {:?}, {} steps, guidance {}, {:?} weights",
            s.kind,
            s.steps,
            r.guidance,
            r.weights.unwrap_or(Weights::Ema)
        );
    }
    say!(
        "samples     {} (seed {}), {:.1} s",
        r.samples,
        r.seed,
        r.wall_time_s
    );
    say!(
        "accuracy    {:.2}%  (judge: {:.2}% on the MNIST test set)",
        100.0 * r.accuracy,
        100.0 * r.classifier_test_accuracy
    );
    let per: Vec<String> = r
        .per_class_accuracy
        .iter()
        .enumerate()
        .map(|(c, a)| format!("{c}:{:.0}%", 100.0 * a))
        .collect();
    say!("per class   {}", per.join(" "));
    say!(
        "Fréchet     {:.3}   (train vs test floor {:.3}, noise vs test ceiling {:.1})",
        r.frechet,
        r.frechet_floor_train_vs_test,
        r.frechet_ceiling_noise_vs_test
    );
    say!("confusion (rows: intended class, columns: judged class)");
    for (c, row) in r.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
        say!("  {c} {}", cells.join(""));
    }
}

/// The quality probe a run asks for (`preview.quality`): its judge, the
/// MNIST test set as the reference and the training set for the floor;
/// it draws with the run's sampler and guidance from the run's seed.
pub fn probe<B: Backend>(
    probe: &crate::config::QualityProbe,
    run: &RunConfig,
    cpu: bool,
    device: &B::Device,
) -> Result<Probe<B>> {
    let judge = Judge::<B>::load(&judge::default_dir(), device)?;
    let test = data::load(DatasetName::Mnist, None, Split::Test)?;
    let train = data::load(DatasetName::Mnist, None, Split::Train)?;
    let how = Generation {
        sampler: run.sampler.clone(),
        guidance: run.guidance,
        batch: 1, // the probe splits its samples over the threads itself
        seed: run.train.trainer.seed,
        threads: sampling_threads(cpu),
    };
    Ok(Probe::new(judge, &test, &train, probe.per_class, how, device))
}
