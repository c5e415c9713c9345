//! `diffusion train`: the training loop.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::Recorder as _;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};
use diffusion_core::{ForwardProcess, NoiseSchedule, Prediction};
use diffusion_data::{BatchLoader, ImageSet, Split};
use diffusion_model::{Ema, UNet, NO_CLASS};

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint::{self, TrainState};
use crate::config::{Preset, RunConfig};
use crate::data::{self, DatasetArg};
use crate::progress;
use crate::sample::{preview_grid, PreviewRequest};

/// `diffusion train` flags. Flags left out take the preset's value.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Starting configuration: seed (the reference run), quick (~6 min on
    /// a 2-core CPU), tiny (seconds, for tests).
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Preset,
    /// Run directory to create (default: runs/<preset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint (same step,
    /// optimizer and EMA state). Other flags are ignored, but --epochs may
    /// extend the run.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["preset", "out"])]
    pub resume: Option<PathBuf>,
    /// Folder with the four IDX files (default: the bundled MNIST).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (Adam).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of everything random: initial weights, data order, t, noise.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train on the first N images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Linear learning-rate warm-up over N steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Cosine decay of the learning rate to the end of training.
    #[arg(long)]
    pub cosine_decay: Option<bool>,
    /// EMA decay of the weights (sampling uses the EMA by default).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Probability of dropping a sample's label (classifier-free guidance).
    #[arg(long)]
    pub label_dropout: Option<f64>,
    /// What the network predicts: the noise (eps), the clean image (x0) or v.
    #[arg(long, value_enum)]
    pub prediction: Option<PredictionArg>,
    /// Weight each sample's loss by min(SNR, γ) relative to its target's
    /// natural weight (Min-SNR-γ, Hang et al. 2023; γ = 5 there).
    #[arg(long, value_name = "GAMMA")]
    pub min_snr_gamma: Option<f64>,
    /// Save a checkpoint every N steps (0 = only at epoch ends).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Threads preparing batches.
    #[arg(long)]
    pub workers: Option<usize>,
    /// On the CPU backend, split each batch into N pieces computed in
    /// parallel threads (keeps both cores busy between the parallel kernels:
    /// seed preset 68 img/s with 1, 79 with 2, 81 with 4 on 2 cores).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Stop (with a checkpoint) once N steps in total are done, as if
    /// interrupted; `--resume` continues.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionArg {
    Eps,
    X0,
    V,
}

impl From<PredictionArg> for Prediction {
    fn from(p: PredictionArg) -> Self {
        match p {
            PredictionArg::Eps => Prediction::Epsilon,
            PredictionArg::X0 => Prediction::Sample,
            PredictionArg::V => Prediction::V,
        }
    }
}

/// Builds the run's configuration from the preset and the flags.
fn configure(args: &TrainArgs) -> Result<RunConfig> {
    let mut c = RunConfig::preset(args.preset);
    let t = &mut c.train;
    if let Some(d) = args.dataset {
        t.dataset = d.into();
    }
    t.data_dir = args.data_dir.clone();
    macro_rules! set {
        ($field:expr, $flag:expr) => {
            if let Some(v) = $flag {
                $field = v;
            }
        };
    }
    set!(t.epochs, args.epochs);
    set!(t.batch_size, args.batch);
    set!(t.lr, args.lr);
    set!(t.seed, args.seed);
    set!(t.lr_schedule.warmup_steps, args.warmup_steps);
    set!(t.lr_schedule.cosine_decay, args.cosine_decay);
    set!(t.ema.decay, args.ema_decay);
    set!(t.label_dropout, args.label_dropout);
    set!(t.checkpoint_every, args.checkpoint_every);
    set!(t.workers, args.workers);
    set!(t.shards, args.shards);
    if args.limit.is_some() {
        t.limit = args.limit;
    }
    if let Some(g) = args.min_snr_gamma {
        if !(g > 0.0 && g.is_finite()) {
            bail!("--min-snr-gamma must be a positive number, got {g}");
        }
        t.min_snr_gamma = Some(g);
    }
    if let Some(p) = args.prediction {
        c.model.prediction = p.into();
    }
    let t = &c.train;
    if t.epochs == 0 || t.batch_size == 0 || t.workers == 0 {
        bail!("--epochs, --batch and --workers must be at least 1");
    }
    if !(t.lr > 0.0 && t.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", t.lr);
    }
    if !(0.0..1.0).contains(&t.label_dropout) {
        bail!("--label-dropout must be in [0, 1), got {}", t.label_dropout);
    }
    if !(0.0..1.0).contains(&t.ema.decay) {
        bail!("--ema-decay must be in [0, 1), got {}", t.ema.decay);
    }
    if t.label_dropout > 0.0 && c.model.num_classes.is_none() {
        bail!("--label-dropout needs a class-conditional model");
    }
    Ok(c)
}

pub fn run(args: TrainArgs) -> Result<i32> {
    let backend = BackendKind::resolve(args.backend);
    let (config, run_dir, resume) = match &args.resume {
        Some(dir) => {
            let mut config = RunConfig::load(dir)?;
            checkpoint::latest(dir)?;
            if let Some(e) = args.epochs {
                config.train.epochs = e;
            }
            (config, dir.clone(), true)
        }
        None => {
            let config = configure(&args)?;
            let run_dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(format!("{:?}", args.preset).to_lowercase()));
            if run_dir.join(crate::config::CONFIG_FILE).exists() {
                bail!(
                    "{} already holds a run; continue it with --resume {0}, or choose another --out",
                    run_dir.display()
                );
            }
            (config, run_dir, false)
        }
    };
    config.model.level_sizes()?;
    let set = data::load(
        config.train.dataset,
        config.train.data_dir.as_deref(),
        Split::Train,
    )?;
    check_data_fits(&config, &set)?;
    let set = match config.train.limit {
        Some(n) if n < set.len => set.truncated(n),
        _ => set,
    };
    if set.len < config.train.batch_size {
        bail!(
            "{} training images are fewer than one batch of {}; lower --batch",
            set.len,
            config.train.batch_size
        );
    }
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    config.save(&run_dir)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)");
        });
    }
    eprintln!(
        "training {:?} preset on {} {} images ({}), backend {}, into {}",
        config.preset,
        set.len,
        config.train.dataset,
        if resume { "resuming" } else { "new run" },
        backend.name(),
        run_dir.display()
    );
    let task = TrainTask {
        config,
        cpu: backend.is_cpu(),
        run_dir,
        resume,
        set: Arc::new(set),
        interrupted,
        stop_after: args.stop_after,
    };
    dispatch(backend, task)
}

fn check_data_fits(config: &RunConfig, set: &ImageSet) -> Result<()> {
    let m = &config.model;
    if m.image_channels != 1 || set.height != m.image_size || set.width != m.image_size {
        bail!(
            "the data holds {}x{} grey images but the model expects {}x{}x{}",
            set.height,
            set.width,
            m.image_channels,
            m.image_size,
            m.image_size
        );
    }
    if let Some(n) = m.num_classes {
        if set.num_classes > n {
            bail!("the data has {} classes but the model has {n}", set.num_classes);
        }
    }
    Ok(())
}

struct TrainTask {
    config: RunConfig,
    /// Whether the backend is the CPU one (shards the batch over threads).
    cpu: bool,
    run_dir: PathBuf,
    resume: bool,
    set: Arc<ImageSet>,
    interrupted: Arc<AtomicBool>,
    stop_after: Option<u64>,
}

/// Touches every parameter once, in a fixed order, so that burn's lazy
/// initialisation draws them now (from the seeded generator) rather than
/// at first use.
struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// A per-step seed: the run's seed mixed with the step (splitmix64), so a
/// resumed run draws the same t, noise and label drops as an uninterrupted one.
fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Task for TrainTask {
    type Output = i32;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<i32> {
        let TrainTask {
            config,
            cpu,
            run_dir,
            resume,
            set,
            interrupted,
            stop_after,
        } = self;
        let tc = &config.train;
        let schedule = NoiseSchedule::new(config.schedule, config.model.num_steps)?;
        let num_steps = config.model.num_steps;

        B::seed(&device, tc.seed);
        let mut model: UNet<B> = config.model.init::<B>(&device)?;
        model.visit(&mut Materialize);
        let mut optim = AdamConfig::new()
            .with_epsilon(tc.adam_epsilon as f32)
            .init::<B, UNet<B>>();
        let mut ema = Ema::new(model.valid(), tc.ema);
        let mut state = TrainState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            ema_updates: 0,
            finished: false,
        };

        if resume {
            let (dir, saved) = checkpoint::latest(&run_dir)?;
            model = checkpoint::load_unet::<B>(&config.model, &dir.join(checkpoint::MODEL), &device)?;
            ema.model =
                checkpoint::load_unet::<B::InnerBackend>(&config.model, &dir.join(checkpoint::EMA), &device)?;
            let record = checkpoint::Recorder::new()
                .load(dir.join(checkpoint::OPTIMIZER), &device)
                .map_err(|e| anyhow::anyhow!("{}: cannot load optimizer state ({e})", dir.display()))?;
            optim = optim.load_record(record);
            state = saved;
            ema.updates = state.ema_updates;
            if state.finished && state.epoch as usize >= tc.epochs {
                eprintln!(
                    "the run already finished {} epochs; pass --epochs N to train longer",
                    state.epoch
                );
                return Ok(0);
            }
            state.finished = false;
            eprintln!(
                "resuming at step {} (epoch {}, batch {})",
                state.step,
                state.epoch + 1,
                state.batch_in_epoch
            );
        }

        let fp = ForwardProcess::<B>::new(&schedule, &device);
        let loader = BatchLoader::new(set.clone(), tc.batch_size, tc.seed, tc.workers);
        let per_epoch = loader.batches_per_epoch() as u64;
        let total = per_epoch * tc.epochs as u64;
        let mut metrics = Metrics::open(&run_dir, state.step)?;
        let conditional = config.model.num_classes.is_some();
        let dropout = tc.label_dropout;
        let shards = if cpu { tc.shards.max(1) } else { 1 };

        let bar = progress::bar(total, "steps");
        bar.set_position(state.step);
        let started = Instant::now();
        let mut window = (Instant::now(), 0u64); // images since the last log
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        let mut loss_count = 0u64;
        let mut epoch_loss = (0.0f64, 0u64);
        let save =
            |model: &UNet<B>, ema: &Ema<UNet<B::InnerBackend>>, optim: &_, state: TrainState| -> Result<()> {
                checkpoint::write(&run_dir, state, |dir| {
                    checkpoint::save_module(model.clone(), &dir.join(checkpoint::MODEL))?;
                    checkpoint::save_module(ema.model.clone(), &dir.join(checkpoint::EMA))?;
                    save_optimizer::<B>(optim, &dir.join(checkpoint::OPTIMIZER))
                })?;
                Ok(())
            };

        while (state.epoch as usize) < tc.epochs {
            let epoch = state.epoch;
            for host in loader.epoch(epoch, state.batch_in_epoch as usize) {
                B::seed(&device, step_seed(tc.seed, state.step));
                let batch = host.to_device::<B>(&device);
                let x0 = batch.images;
                let n = x0.dims()[0];
                // t uniform in 1..=T, drawn on the device.
                let u = Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), &device);
                let t: Tensor<B, 1, Int> = u
                    .mul_scalar(num_steps as f64)
                    .int()
                    .add_scalar(1)
                    .clamp(1, num_steps as i64);
                let eps = Tensor::<B, 4>::random(x0.dims(), Distribution::Normal(0.0, 1.0), &device);
                let classes = conditional.then(|| {
                    if dropout > 0.0 {
                        let drop = Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), &device)
                            .lower_elem(dropout);
                        batch.labels.clone().mask_fill(drop, NO_CLASS)
                    } else {
                        batch.labels.clone()
                    }
                });
                let inputs = StepInputs { x0, t, eps, classes };
                let losses = Losses {
                    fp: &fp,
                    prediction: config.model.prediction,
                    min_snr_gamma: tc.min_snr_gamma,
                    has_null: dropout > 0.0,
                };
                let (grads, loss) = sharded_step(&model, inputs, shards, &losses);

                let lr = tc.lr_schedule.at(tc.lr, state.step, total);
                model = optim.step(lr, model, grads);
                ema.update(&model.valid());

                loss_sum = Some(match loss_sum.take() {
                    Some(s) => s + loss,
                    None => loss,
                });
                loss_count += 1;
                state.step += 1;
                state.batch_in_epoch += 1;
                state.ema_updates = ema.updates;
                window.1 += n as u64;
                bar.set_position(state.step);

                if state.step % tc.log_every == 0 || state.batch_in_epoch == per_epoch {
                    let sum: f64 = loss_sum.take().expect("at least one loss").into_scalar().elem();
                    let mean = sum / loss_count as f64;
                    if !mean.is_finite() {
                        bail!("the loss became {mean} at step {}; lower --lr", state.step);
                    }
                    epoch_loss.0 += mean * loss_count as f64;
                    epoch_loss.1 += loss_count;
                    loss_count = 0;
                    let ips = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                    window = (Instant::now(), 0);
                    bar.set_message(format!(
                        "epoch {}/{} · loss {mean:.4} · {ips:.0} img/s",
                        epoch + 1,
                        tc.epochs
                    ));
                    metrics.row(state.step, epoch, mean, lr, ips, started.elapsed().as_secs_f64())?;
                }
                let stop = interrupted.load(Ordering::SeqCst) || stop_after.is_some_and(|s| state.step >= s);
                if stop || (tc.checkpoint_every > 0 && state.step % tc.checkpoint_every == 0) {
                    save(&model, &ema, &optim, state)?;
                }
                if stop {
                    bar.abandon();
                    eprintln!(
                        "stopped at step {}; checkpoint saved. Continue with: cargo xtask train --resume {}",
                        state.step,
                        run_dir.display()
                    );
                    return Ok(if interrupted.load(Ordering::SeqCst) {
                        130
                    } else {
                        0
                    });
                }
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
            state.finished = state.epoch as usize >= tc.epochs;
            save(&model, &ema, &optim, state)?;
            let grid = run_dir
                .join("samples")
                .join(format!("epoch-{:03}.png", state.epoch));
            let preview = PreviewRequest {
                sampler: &config.preview.sampler,
                n: config.preview.n,
                seed: tc.seed,
                channels: config.model.image_channels,
                size: config.model.image_size,
                num_classes: config.model.num_classes,
            };
            preview_grid::<B::InnerBackend>(&ema.model, &schedule, &preview, &grid, &device)?;
            let mean = if epoch_loss.1 > 0 {
                epoch_loss.0 / epoch_loss.1 as f64
            } else {
                f64::NAN
            };
            bar.suspend(|| {
                eprintln!(
                    "epoch {}/{}: mean loss {mean:.4}, {} steps, {:.0} s elapsed; samples: {}",
                    state.epoch,
                    tc.epochs,
                    state.step,
                    started.elapsed().as_secs_f64(),
                    grid.display()
                )
            });
            epoch_loss = (0.0, 0);
        }
        bar.finish_and_clear();
        eprintln!(
            "done: {} steps in {:.0} s. Sample with: cargo xtask sample --checkpoint {}",
            state.step,
            started.elapsed().as_secs_f64(),
            run_dir.display()
        );
        Ok(0)
    }
}

/// One training batch on the device.
struct StepInputs<B: Backend> {
    x0: Tensor<B, 4>,
    t: Tensor<B, 1, Int>,
    eps: Tensor<B, 4>,
    classes: Option<Tensor<B, 1, Int>>,
}

impl<B: Backend> StepInputs<B> {
    /// Samples [start, start + len) of the batch.
    fn shard(&self, start: usize, len: usize) -> Self {
        Self {
            x0: self.x0.clone().narrow(0, start, len),
            t: self.t.clone().narrow(0, start, len),
            eps: self.eps.clone().narrow(0, start, len),
            classes: self.classes.as_ref().map(|c| c.clone().narrow(0, start, len)),
        }
    }
}

/// The training loss of a batch.
struct Losses<'a, B: Backend> {
    fp: &'a ForwardProcess<B>,
    prediction: Prediction,
    min_snr_gamma: Option<f64>,
    /// Whether class ids may be NO_CLASS (label dropout).
    has_null: bool,
}

impl<B: Backend> Losses<'_, B> {
    /// Mean squared error to the target (Min-SNR weighted when asked).
    fn loss(&self, model: &UNet<B>, inputs: StepInputs<B>) -> Tensor<B, 1> {
        let StepInputs { x0, t, eps, classes } = inputs;
        let x_t = self.fp.noise(x0.clone(), t.clone(), eps.clone());
        let output = model.forward_masked(x_t, t.clone(), classes, self.has_null);
        let alpha_bar = self.fp.alpha_bar(t); // [B, 1, 1, 1]
        let target = self.prediction.target(x0, eps, alpha_bar.clone());
        match self.min_snr_gamma {
            None => (output - target).powi_scalar(2).mean(),
            Some(gamma) => {
                let per_sample = (output - target).powi_scalar(2).mean_dims(&[1, 2, 3]); // [B, 1, 1, 1]
                (per_sample * min_snr_weight(alpha_bar, gamma, self.prediction)).mean()
            }
        }
    }
}

/// Gradients and loss of a batch, computed as `shards` pieces in parallel
/// threads and merged (each piece weighted by its share of the batch), so
/// that the CPU backend's single-threaded stretches between its parallel
/// kernels overlap.
/// The result is the gradient of the whole batch's mean loss.
fn sharded_step<B: AutodiffBackend>(
    model: &UNet<B>,
    inputs: StepInputs<B>,
    shards: usize,
    losses: &Losses<'_, B>,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
    let n = inputs.x0.dims()[0];
    let shards = shards.clamp(1, n);
    if shards == 1 {
        let loss = losses.loss(model, inputs);
        let grads = GradientsParams::from_grads(loss.backward(), model);
        return (grads, loss.inner());
    }
    let bounds: Vec<(usize, usize)> = (0..shards)
        .map(|k| (k * n / shards, (k + 1) * n / shards))
        .collect();
    let parts: Vec<(GradientsParams, Tensor<B::InnerBackend, 1>, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .iter()
            .map(|&(a, b)| {
                let shard = inputs.shard(a, b - a);
                // A copy with leaves of its own (same parameter ids), so the
                // shards' autodiff graphs stay apart.
                let model: UNet<B> = model.valid().train::<B>();
                scope.spawn(move || {
                    let loss = losses.loss(&model, shard);
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    (grads, loss.inner(), (b - a) as f64 / n as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a training shard panicked"))
            .collect()
    });
    let mut loss = None;
    let mut weighted = Vec::with_capacity(parts.len());
    for (grads, l, w) in parts {
        let l = l.mul_scalar(w);
        loss = Some(match loss {
            Some(acc) => acc + l,
            None => l,
        });
        weighted.push((grads, w));
    }
    let mut merge = MergeGrads::<B> {
        parts: weighted,
        merged: GradientsParams::new(),
        _b: std::marker::PhantomData,
    };
    model.visit(&mut merge);
    (merge.merged, loss.expect("at least one shard"))
}

/// Σ w_k·g_k over the shards' gradients, parameter by parameter.
struct MergeGrads<B> {
    parts: Vec<(GradientsParams, f64)>,
    merged: GradientsParams,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for MergeGrads<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let mut acc: Option<Tensor<B::InnerBackend, D>> = None;
        for (grads, w) in &mut self.parts {
            if let Some(g) = grads.remove::<B::InnerBackend, D>(param.id) {
                let g = g.mul_scalar(*w);
                acc = Some(match acc {
                    Some(a) => a + g,
                    None => g,
                });
            }
        }
        if let Some(g) = acc {
            self.merged.register(param.id, g);
        }
    }
}

/// Min-SNR-γ weights per sample: min(SNR, γ) divided by the weight the
/// target already gives each t in terms of x0 error (SNR for ε, 1 for x0,
/// SNR + 1 for v), SNR = ᾱ/(1 − ᾱ).
fn min_snr_weight<B: Backend>(alpha_bar: Tensor<B, 4>, gamma: f64, prediction: Prediction) -> Tensor<B, 4> {
    let snr = alpha_bar.clone() / alpha_bar.neg().add_scalar(1.0).clamp_min(1e-12);
    let clipped = snr.clone().clamp_max(gamma);
    match prediction {
        Prediction::Epsilon => clipped / snr.clamp_min(1e-12),
        Prediction::Sample => clipped,
        Prediction::V => clipped / snr.add_scalar(1.0),
    }
}

fn save_optimizer<B: AutodiffBackend>(optim: &impl Optimizer<UNet<B>, B>, file: &Path) -> Result<()> {
    checkpoint::Recorder::new()
        .record(optim.to_record(), file.to_path_buf())
        .map_err(|e| anyhow::anyhow!("{}: cannot save optimizer state: {e}", file.display()))
}

/// `metrics.csv`: step, epoch, loss, lr, img/s, elapsed seconds.
struct Metrics {
    file: fs::File,
}

impl Metrics {
    /// Opens the run's metrics, dropping rows past `step` (written after
    /// the checkpoint a resumed run starts from).
    fn open(run_dir: &Path, step: u64) -> Result<Self> {
        let path = run_dir.join("metrics.csv");
        let header = "step,epoch,loss,lr,img_per_s,elapsed_s";
        let kept: Vec<String> = fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s <= step)
            })
            .map(str::to_string)
            .collect();
        let mut text = String::from(header);
        text.push('\n');
        for line in kept {
            text.push_str(&line);
            text.push('\n');
        }
        crate::fsutil::write_bytes_atomically(&path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn row(&mut self, step: u64, epoch: u64, loss: f64, lr: f64, ips: f64, elapsed: f64) -> Result<()> {
        writeln!(
            self.file,
            "{step},{},{loss:.6},{lr:.6e},{ips:.1},{elapsed:.2}",
            epoch + 1
        )?;
        Ok(())
    }
}
