//! `diffusion train`: the training loop.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use diffusion_core::{NoiseSchedule, Prediction};
use diffusion_data::{BatchLoader, ImageSet, Split};
use diffusion_model::UNet;
use diffusion_train::distributed::{self, parse_host_port, start_orchestrator, Cluster, Nodes};
use diffusion_train::{
    CheckpointError, EpochEnd, Fit, FitConfig, FitError, FitObserver, HookError, LogEvent, RunLock, Start,
    Stop, Trainer,
};

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint;
use crate::config::{Preset, RunConfig, Weights};
use crate::data::{self, DatasetArg};
use crate::progress;
use crate::sample::{preview_grid, PreviewRequest};

/// `diffusion train` flags. Flags left out take the preset's value.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Starting configuration: seed (the reference run), quick (5-10 min on
    /// a 2-core CPU), full (the best digits in ~45 min on 2 cores), tiny
    /// (seconds, for tests).
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
    /// Digits per class sampled and judged after every epoch (accuracy and
    /// Fréchet distance in quality.csv and training.png; 0 = off; MNIST only).
    #[arg(long, value_name = "N")]
    pub quality_per_class: Option<usize>,
    /// Stop (with a checkpoint) once N steps in total are done, as if
    /// interrupted; `--resume` continues.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// Data-parallel replicas in this process: cuda:0..N-1, wgpu GPUs
    /// 0..N-1, or N CPU replicas. Gradients are averaged every step, so
    /// the run trains as one device would on the global batch.
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
    /// Processes (machines) in the run, each with --devices replicas; run
    /// the same command on each, with its own --node-rank.
    #[arg(long, value_name = "M")]
    pub nodes: Option<u32>,
    /// This node's rank, 0..M-1. Node 0 hosts the coordinator and writes
    /// checkpoints, metrics and samples.
    #[arg(long, value_name = "R")]
    pub node_rank: Option<u32>,
    /// Where node 0 listens for the others (its address as they see it).
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// Where the other nodes reach this node's tensor service (default
    /// with a 127.0.0.1 coordinator: 127.0.0.1:<coordinator port + 1 + rank>).
    #[arg(long, value_name = "HOST:PORT")]
    pub node_address: Option<String>,
    /// Seconds a replica waits for the others in one step before it gives
    /// up (a peer died or never connected). Must exceed node 0's longest
    /// pause: its epoch-end samples and quality probe.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub collective_timeout: u64,
}

/// The data-parallel layout asked for by the flags (`None`: one device).
fn cluster_from(args: &TrainArgs) -> Result<Option<Cluster>> {
    let devices = args.devices.unwrap_or(1);
    if devices == 0 {
        bail!("--devices must be at least 1");
    }
    if devices > 64 {
        bail!("--devices {devices}: at most 64 replicas per process");
    }
    let nodes = match args.nodes.unwrap_or(1) {
        0 => bail!("--nodes must be at least 1"),
        1 => {
            if args.node_rank.is_some_and(|r| r > 0)
                || args.coordinator.is_some()
                || args.node_address.is_some()
            {
                bail!("--node-rank, --coordinator and --node-address need --nodes M (more than 1)");
            }
            None
        }
        count => {
            let rank = args
                .node_rank
                .ok_or_else(|| anyhow::anyhow!("--nodes {count} needs --node-rank R (0 on the machine that coordinates, 1..{} on the others)", count - 1))?;
            let coordinator = args.coordinator.clone().ok_or_else(|| {
                anyhow::anyhow!("--nodes {count} needs --coordinator HOST:PORT (node 0's address and a free port, the same on every node)")
            })?;
            let (host, port) =
                parse_host_port(&coordinator).map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
            let address = match &args.node_address {
                Some(a) => a.clone(),
                None if host == "127.0.0.1" || host == "localhost" => {
                    format!("127.0.0.1:{}", u32::from(port) + 1 + rank)
                }
                None => bail!(
                    "--node-address HOST:PORT is needed with a coordinator on another machine: this node's address as the other nodes see it, and a free port"
                ),
            };
            Some(Nodes {
                count,
                rank,
                coordinator,
                address,
            })
        }
    };
    if args.collective_timeout == 0 {
        bail!("--collective-timeout must be at least 1 second");
    }
    let cluster = Cluster {
        devices_per_node: devices,
        nodes,
        timeout: Duration::from_secs(args.collective_timeout),
    };
    if cluster.world_size() == 1 {
        return Ok(None);
    }
    cluster.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Some(cluster))
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
fn configure(args: &TrainArgs, world: usize) -> Result<RunConfig> {
    let mut c = RunConfig::preset(args.preset);
    c.train.world_size = world;
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
    // --batch is per device (as in PyTorch DDP); the preset's own batch is
    // the global one, split over the replicas.
    set!(t.batch_size, args.batch.map(|b| b.saturating_mul(world)));
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
    if c.train.dataset != diffusion_data::DatasetName::Mnist {
        // The probe's judge knows digits only.
        c.preview.quality = None;
    }
    match args.quality_per_class {
        Some(0) => c.preview.quality = None,
        Some(n) => {
            let guidance = if c.train.label_dropout > 0.0 { 2.0 } else { 1.0 };
            let q = c.preview.quality.get_or_insert(crate::config::QualityProbe {
                per_class: n,
                sampler: diffusion_core::SamplerConfig::new(diffusion_core::SamplerKind::DpmSolverPp, 10),
                guidance,
            });
            q.per_class = n;
        }
        None => {}
    }
    c.validate()?;
    Ok(c)
}

pub fn run(args: TrainArgs) -> Result<i32> {
    if args.stop_after == Some(0) {
        bail!("--stop-after must be at least 1 (the step count to stop at)");
    }
    let backend = BackendKind::resolve(args.backend);
    let cluster = cluster_from(&args)?;
    if cluster.is_some() && std::env::var_os("DIFFUSION_COLLECTIVE_LOG").is_none() {
        // burn's network layer logs every connection at INFO level to
        // stdout; our progress line says what matters. Set
        // DIFFUSION_COLLECTIVE_LOG=1 to see its log.
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    }
    let world = cluster.as_ref().map_or(1, Cluster::world_size);
    // Only node 0 writes into the run directory; the others read it when
    // resuming (it must be on every node: a shared folder, or a copy).
    let lead = cluster.as_ref().is_none_or(Cluster::is_lead_node);
    let (config, run_dir, resume, save_config) = open_run(&args, world, lead)?;
    let lock = lock_run(&run_dir, lead, resume)?;
    let set = training_set(&config)?;
    if lead && !resume {
        config.save(&run_dir)?;
    }
    start_node(cluster.as_ref(), world)?;
    let interrupted = stop_on_signals();
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
        save_config,
        set: Arc::new(set),
        interrupted,
        stop_after: args.stop_after,
        cluster,
        _lock: lock,
    };
    dispatch(backend, task)
}

/// The run's configuration and directory: a new one from the flags, or the
/// one `--resume` names (with `--epochs` and the world size it may change).
/// Also whether config.json must be rewritten once the resume succeeds.
fn open_run(args: &TrainArgs, world: usize, lead: bool) -> Result<(RunConfig, PathBuf, bool, bool)> {
    let (mut config, run_dir, resume) = match &args.resume {
        Some(dir) => (RunConfig::load(dir)?, dir.clone(), true),
        None => {
            let config = configure(&args, world)?;
            let run_dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(format!("{:?}", args.preset).to_lowercase()));
            if lead && run_dir.join(crate::config::CONFIG_FILE).exists() {
                let started = if checkpoint::latest(&run_dir).is_ok() {
                    "a run"
                } else {
                    "a run stopped before its first checkpoint"
                };
                bail!(
                    "{} already holds {started}; continue it with --resume {0} (it starts again from step 0 when there is no checkpoint), or choose another --out",
                    run_dir.display()
                );
            }
            (config, run_dir, false)
        }
    };
    // --epochs may extend a resumed run; config.json changes only once the
    // resume has succeeded.
    let new_epochs = args.epochs.filter(|&e| resume && e != config.train.epochs);
    if let Some(e) = new_epochs {
        config.train.epochs = e;
    }
    // A resumed run may change its world size: the global batch (and with
    // it the data order and the steps) stays, each replica's share changes.
    let new_world = resume && world != config.train.world_size;
    if new_world {
        if config.train.batch_size % world != 0 {
            bail!(
                "{}: its global batch of {} does not split over {world} replicas; resume with a world size (--devices × --nodes) that divides it",
                run_dir.join(crate::config::CONFIG_FILE).display(),
                config.train.batch_size
            );
        }
        config.train.world_size = world;
    }
    config.validate()?;
    Ok((
        config,
        run_dir,
        resume,
        lead && (new_epochs.is_some() || new_world),
    ))
}

/// The run directory's lock (held by the node that writes), and a last
/// check that no other `train` made a run there meanwhile.
fn lock_run(run_dir: &Path, lead: bool, resume: bool) -> Result<Option<RunLock>> {
    let lock = if lead {
        let lock = RunLock::acquire(run_dir)?;
        if let Some(pid) = lock.removed_stale {
            eprintln!(
                "note: removed a stale lock of process {pid}, which no longer runs (killed before it could clean up)"
            );
        }
        Some(lock)
    } else {
        None
    };
    if lead && !resume && run_dir.join(crate::config::CONFIG_FILE).exists() {
        // Another `train` made this run between our check and the lock.
        bail!(
            "{} already holds a run (made a moment ago by another process); choose another --out",
            run_dir.display()
        );
    }
    Ok(lock)
}

/// The training images the run asks for, checked against its model.
fn training_set(config: &RunConfig) -> Result<ImageSet> {
    let set = data::load(
        config.train.dataset,
        config.train.data_dir.as_deref(),
        Split::Train,
    )?;
    check_data_fits(config, &set)?;
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
    Ok(set)
}

/// On a multi-node run: node 0 starts burn's orchestrator; every node says
/// where it stands.
fn start_node(cluster: Option<&Cluster>, world: usize) -> Result<()> {
    if let Some(nodes) = cluster.and_then(|c| c.nodes.as_ref()) {
        if nodes.rank == 0 {
            let (_, port) =
                parse_host_port(&nodes.coordinator).map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
            start_orchestrator(port).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        eprintln!(
            "node {} of {}: {} replica(s) here, {world} in all; coordinator {}, this node at {}",
            nodes.rank,
            nodes.count,
            cluster.map_or(1, |c| c.devices_per_node),
            nodes.coordinator,
            nodes.address
        );
    }

    Ok(())
}

/// A flag raised by Ctrl-C, SIGTERM or SIGHUP: training saves a checkpoint
/// after the current step. A second signal exits at once.
fn stop_on_signals() -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C, SIGTERM (timeout, docker stop, batch schedulers) and SIGHUP.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: saving a checkpoint after this step (interrupt again to quit at once)");
        });
    }
    interrupted
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
    // Files recognised by their checksums as another data set than the
    // one asked for (say MNIST files under --dataset fashion-mnist).
    if let Some(known) = set.known {
        if known != config.train.dataset {
            bail!(
                "{}: these files are {known}, but the run asks for {}; pass --dataset {known} or point --data-dir at {1}",
                config
                    .train
                    .data_dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| "the data folder".into()),
                config.train.dataset
            );
        }
    }
    Ok(())
}

struct TrainTask {
    config: RunConfig,
    /// Whether to rewrite config.json once the resume has succeeded.
    save_config: bool,
    /// Held for the whole run by the node that writes; released on return.
    _lock: Option<RunLock>,
    /// Data-parallel replicas, if more than one.
    cluster: Option<Cluster>,
    /// Whether the backend is the CPU one (shards the batch over threads).
    cpu: bool,
    run_dir: PathBuf,
    resume: bool,
    set: Arc<ImageSet>,
    interrupted: Arc<AtomicBool>,
    stop_after: Option<u64>,
}

impl Task for TrainTask {
    type Output = i32;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<i32> {
        self.run_on::<B>(vec![device])
    }

    fn devices(&self) -> usize {
        self.cluster.as_ref().map_or(1, |c| c.devices_per_node)
    }

    fn run_on<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<i32> {
        let TrainTask {
            config,
            save_config,
            _lock,
            cpu,
            run_dir,
            resume,
            set,
            interrupted,
            stop_after,
            cluster,
        } = self;
        let tc = &config.train;
        let schedule = NoiseSchedule::new(config.schedule, config.model.num_steps)?;
        let loader = BatchLoader::new(set, tc.batch_size, tc.seed, tc.workers);
        let total = loader.batches_per_epoch() as u64 * tc.epochs as u64;
        let fit = Fit::new(
            &run_dir,
            FitConfig {
                epochs: tc.epochs,
                log_every: tc.log_every,
                checkpoint_every: tc.checkpoint_every,
                stop_after,
                conditional: config.model.num_classes.is_some(),
            },
        )
        .with_stop_flag(interrupted.clone());

        let Some(mut trainers) = build_trainers(&config, &fit, &devices, total, cpu, resume, &run_dir)?
        else {
            return Ok(0);
        };
        if resume && save_config {
            config.save(&run_dir)?;
        }

        let mut hooks = Hooks::<B> {
            config: &config,
            schedule: &schedule,
            run_dir: &run_dir,
            device: devices[0].clone(),
            cpu,
            total,
            bar: None,
            metrics: None,
            probe: None,
        };
        let outcome = match &cluster {
            None => fit.run(&mut trainers[0], &loader, &devices[0], &mut hooks),
            Some(cluster) => {
                let recipe = recipe(&config, &trainers[0]);
                // A failed replica would leave the others waiting for it
                // until the time limit: end the process now.
                let fit = fit.clone().on_replica_error(|local, e| {
                    eprintln!("error: replica {local}: {e}");
                    std::process::exit(1);
                });
                fit.run_cluster(cluster, &mut trainers, &devices, &loader, &recipe, &mut hooks)
            }
        }
        .map_err(|e| fit_error(e, &config, &run_dir))?;
        report(
            &outcome,
            cluster.as_ref(),
            hooks.bar.as_ref(),
            hooks.started(),
            &run_dir,
        );
        Ok(if interrupted.load(Ordering::SeqCst) {
            130
        } else {
            0
        })
    }
}

/// One trainer per device, each from the same seeded initialisation and,
/// on a resume, the same checkpoint (built in turn: the initialisation
/// draws from the backend's generator). `None` when the run is already
/// finished.
#[allow(clippy::too_many_arguments)]
fn build_trainers<B: AutodiffBackend>(
    config: &RunConfig,
    fit: &Fit,
    devices: &[B::Device],
    total: u64,
    cpu: bool,
    resume: bool,
    run_dir: &Path,
) -> Result<Option<Vec<Trainer<B, UNet<B>>>>> {
    let tc = &config.train;
    let schedule = NoiseSchedule::new(config.schedule, config.model.num_steps)?;
    // Every replica starts from the same weights: the same seeded
    // initialisation, or the same checkpoint. Built here in turn (the
    // initialisation draws from the backend's generator).
    let mut trainers = Vec::with_capacity(devices.len());
    let mut start = Start::Fresh;
    for device in devices {
        let model: UNet<B> = config.model.init_seeded::<B>(device, tc.seed)?;
        let mut trainer = Trainer::new(model, &schedule, config.trainer_config(total, cpu), device);
        if resume {
            start = fit
                .open(&mut trainer)
                .map_err(|e| fit_error(e, config, run_dir))?;
        }
        trainers.push(trainer);
    }
    match start {
        Start::Fresh if resume => {
            eprintln!("no checkpoint yet (the run stopped before its first one): starting it from step 0")
        }
        Start::Fresh => {}
        Start::Finished(state) => {
            eprintln!(
                "the run already finished {} epochs; pass --epochs N (more than {0}) to train longer",
                state.epoch
            );
            return Ok(None);
        }
        Start::Resumed(state) => eprintln!(
            "resuming at step {} (epoch {}, batch {})",
            state.step,
            state.epoch + 1,
            state.batch_in_epoch
        ),
    }
    Ok(Some(trainers))
}

/// The last line of a run: how it ended and what to do next.
fn report(
    outcome: &diffusion_train::Outcome,
    cluster: Option<&Cluster>,
    bar: Option<&indicatif::ProgressBar>,
    took: Duration,
    run_dir: &Path,
) {
    match (outcome.stop, cluster) {
        (_, Some(c)) if !c.is_lead_node() => eprintln!(
            "node {}: stopped at step {} (replica {}); node 0 wrote the checkpoints",
            c.nodes.as_ref().map_or(0, |n| n.rank),
            outcome.state.step,
            c.rank_of(0)
        ),
        (Stop::Finished, _) => {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            eprintln!(
                "done: {} steps in {:.0} s. Sample with: cargo xtask sample --checkpoint {}",
                outcome.state.step,
                took.as_secs_f64(),
                run_dir.display()
            );
        }
        (Stop::Requested | Stop::StepLimit, _) => eprintln!(
            "stopped at step {}; checkpoint saved. Continue with: cargo xtask train --resume {}",
            outcome.state.step,
            run_dir.display()
        ),
    }
}

/// What `train` shows and writes around the library's loop: the progress
/// bar, `metrics.csv`, the epoch previews, the quality probe and the plot.
struct Hooks<'a, B: AutodiffBackend> {
    config: &'a RunConfig,
    schedule: &'a NoiseSchedule,
    run_dir: &'a Path,
    device: B::Device,
    cpu: bool,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    metrics: Option<(Metrics, Instant)>,
    probe: Option<(diffusion_eval::Probe<B::InnerBackend>, Metrics)>,
}

impl<B: AutodiffBackend> Hooks<'_, B> {
    fn started(&self) -> Duration {
        self.metrics.as_ref().map_or(Duration::ZERO, |m| m.1.elapsed())
    }

    fn bar(&self) -> &indicatif::ProgressBar {
        self.bar.as_ref().expect("the bar is made in on_start")
    }

    /// The epoch's preview grid, drawn as `sample` draws.
    fn preview(&self, trainer: &Trainer<B, UNet<B>>, epochs_done: u64) -> Result<PathBuf> {
        let grid = self
            .run_dir
            .join("samples")
            .join(format!("epoch-{epochs_done:03}.png"));
        let c = self.config;
        let preview = PreviewRequest {
            sampler: &c.preview.sampler,
            guidance: c.guidance,
            n: c.preview.n,
            seed: c.train.seed,
            channels: c.model.image_channels,
            size: c.model.image_size,
            num_classes: c.model.num_classes,
        };
        let weights = sampling_model(trainer, c.sample_weights);
        preview_grid::<B::InnerBackend>(&weights, self.schedule, &preview, &grid, &self.device)?;
        Ok(grid)
    }
}

impl<B: AutodiffBackend> FitObserver<B, UNet<B>> for Hooks<'_, B> {
    fn on_start(&mut self, trainer: &Trainer<B, UNet<B>>) -> Result<(), HookError> {
        let step = trainer.state().step;
        self.metrics = Some((Metrics::open(self.run_dir, step)?, Instant::now()));
        if let Some(q) = &self.config.preview.quality {
            let mut quality = Metrics::open_quality(self.run_dir, step)?;
            let probe =
                crate::eval::probe::<B::InnerBackend>(q, self.config.train.seed, self.cpu, &self.device)?;
            // Before any training: the floor in the plot from the start.
            if step == 0 {
                let weights = sampling_model(trainer, self.config.sample_weights);
                let r = probe.measure(&weights, self.schedule, &self.device)?;
                quality.quality_row(0, 0, &r, probe.floor)?;
            }
            self.probe = Some((probe, quality));
        }
        let bar = progress::bar(self.total, "steps");
        bar.set_position(step);
        self.bar = Some(bar);
        Ok(())
    }

    fn on_step(&mut self, state: diffusion_train::TrainState) {
        self.bar().set_position(state.step);
    }

    fn on_log(&mut self, _: &Trainer<B, UNet<B>>, log: &LogEvent) -> Result<(), HookError> {
        let world = log.world as f64;
        let reduce_ms = 1e3 * log.all_reduce.as_secs_f64();
        let parallel = if log.world > 1 {
            format!(
                " ({:.0}/replica) · all-reduce {reduce_ms:.0} ms",
                log.images_per_s / world
            )
        } else {
            String::new()
        };
        self.bar().set_message(format!(
            "epoch {}/{} · loss {:.4} · {:.0} img/s{parallel}",
            log.epoch + 1,
            self.config.train.epochs,
            log.loss,
            log.images_per_s
        ));
        let (metrics, started) = self.metrics.as_mut().expect("opened in on_start");
        metrics.row(&MetricsRow {
            step: log.step,
            epoch: log.epoch,
            loss: log.loss,
            lr: log.lr,
            ips: log.images_per_s,
            elapsed: started.elapsed().as_secs_f64(),
            ips_per_replica: log.images_per_s / world,
            reduce_ms,
        })?;
        Ok(())
    }

    fn on_epoch_end(&mut self, trainer: &Trainer<B, UNet<B>>, end: &EpochEnd) -> Result<(), HookError> {
        let grid = self.preview(trainer, end.epochs_done)?;
        let mut quality_note = String::new();
        if let Some((probe, quality)) = &mut self.probe {
            let weights = sampling_model(trainer, self.config.sample_weights);
            let bar = self.bar.as_ref().expect("made in on_start");
            let r = bar.suspend(|| probe.measure(&weights, self.schedule, &self.device))?;
            quality.quality_row(end.step, end.epochs_done, &r, probe.floor)?;
            quality_note = format!(
                "; samples {:.1}% correct, Fréchet {:.1} (floor {:.1})",
                100.0 * r.accuracy,
                r.frechet,
                probe.floor
            );
        }
        crate::plot::draw_run(self.run_dir)?;
        let loss_note = match end.mean_loss {
            Some(l) => format!("mean loss {l:.4}"),
            None => "stopped at its end and resumed (its losses are in metrics.csv)".to_string(),
        };
        self.bar().suspend(|| {
            eprintln!(
                "epoch {}/{}: {loss_note}, {} steps, {:.0} s elapsed{quality_note}; samples: {}",
                end.epochs_done,
                self.config.train.epochs,
                end.step,
                end.elapsed.as_secs_f64(),
                grid.display()
            )
        });
        Ok(())
    }

    fn on_stop(&mut self, _: &Trainer<B, UNet<B>>, _: Stop) -> Result<(), HookError> {
        self.bar().abandon();
        Ok(())
    }
}

/// The library loop's error as this program reports it: what happened,
/// what was kept, how to go on.
fn fit_error(e: FitError, config: &RunConfig, run_dir: &Path) -> anyhow::Error {
    match e {
        FitError::NonFiniteLoss { step, loss }
        | FitError::Checkpoint(CheckpointError::NonFiniteLoss { step, loss }) => {
            non_finite(loss, step, config, run_dir)
        }
        FitError::Distributed(e) => lost_replica(e, run_dir),
        FitError::Hook(e) => {
            // The hook's own error, with its causes, as `{:#}` shows them.
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            anyhow::anyhow!(text)
        }
        other => other.into(),
    }
}

/// A step that could not reach the other replicas: what happened, what is
/// kept, how to go on.
fn lost_replica(e: distributed::DistributedError, run_dir: &Path) -> anyhow::Error {
    let kept = match checkpoint::latest(run_dir) {
        Ok((_, s)) => format!("the last checkpoint (step {}) is intact", s.step),
        Err(_) => "no checkpoint was written yet".to_string(),
    };
    anyhow::anyhow!(
        "{e}; {kept}. Start every node again with --resume {}",
        run_dir.display()
    )
}

/// What every replica must agree on before training besides the step and
/// the weights: the recipe (not the per-machine settings).
fn recipe<B: AutodiffBackend>(config: &RunConfig, trainer: &Trainer<B, UNet<B>>) -> Vec<u8> {
    let mut trainer_config = serde_json::to_value(trainer.config()).unwrap_or_default();
    if let Some(fields) = trainer_config.as_object_mut() {
        // Threads per replica: a per-machine choice, not part of the recipe.
        fields.remove("shards");
    }
    let recipe = serde_json::json!({
        "model": config.model,
        "schedule": config.schedule,
        "epochs": config.train.epochs,
        "batch": config.train.batch_size,
        "trainer": trainer_config,
        "dataset": config.train.dataset,
        "limit": config.train.limit,
        // Every node must count the same replicas (--devices × --nodes).
        "world": config.train.world_size,
    });
    recipe.to_string().into_bytes()
}

/// The error for a NaN or infinite loss: what happened, what was kept,
/// what to change.
fn non_finite(loss: f64, step: u64, config: &RunConfig, run_dir: &Path) -> anyhow::Error {
    let kept = match checkpoint::latest(run_dir) {
        Ok((_, s)) => format!("the last good checkpoint (step {}) stays latest", s.step),
        Err(_) => "no checkpoint was written".to_string(),
    };
    anyhow::anyhow!(
        "the loss became {loss} by step {step}; nothing of this state was saved and {kept}. Lower the learning rate (lr {} in {}) or add --warmup-steps, then train again (--resume continues from the last checkpoint)",
        config.train.lr,
        run_dir.join(crate::config::CONFIG_FILE).display()
    )
}

/// One line of `metrics.csv`.
struct MetricsRow {
    step: u64,
    epoch: u64,
    loss: f64,
    lr: f64,
    /// Images per second, all replicas together.
    ips: f64,
    elapsed: f64,
    ips_per_replica: f64,
    /// Mean time of a step's gradient all-reduce (0 on one device).
    reduce_ms: f64,
}

/// `metrics.csv`: step, epoch, loss, lr, img/s, elapsed seconds, img/s per
/// replica, all-reduce milliseconds per step.
struct Metrics {
    file: fs::File,
}

impl Metrics {
    /// Opens the run's metrics, dropping rows past `step` (written after
    /// the checkpoint a resumed run starts from).
    fn open(run_dir: &Path, step: u64) -> Result<Self> {
        Self::open_csv(
            run_dir,
            "metrics.csv",
            "step,epoch,loss,lr,img_per_s,elapsed_s,img_per_s_per_replica,allreduce_ms",
            step,
        )
    }

    /// `quality.csv`: the probe's accuracy and Fréchet distance per epoch.
    fn open_quality(run_dir: &Path, step: u64) -> Result<Self> {
        Self::open_csv(
            run_dir,
            "quality.csv",
            "step,epoch,accuracy,frechet,frechet_floor",
            step,
        )
    }

    /// Opens a CSV file of the run whose first column is the step, keeping
    /// the rows up to `step`.
    fn open_csv(run_dir: &Path, name: &str, header: &str, step: u64) -> Result<Self> {
        let path = run_dir.join(name);
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

    fn quality_row(
        &mut self,
        step: u64,
        epoch: u64,
        r: &diffusion_eval::ProbeResult,
        floor: f64,
    ) -> Result<()> {
        writeln!(
            self.file,
            "{step},{epoch},{:.4},{:.3},{floor:.3}",
            r.accuracy, r.frechet
        )?;
        Ok(())
    }

    fn row(&mut self, r: &MetricsRow) -> Result<()> {
        writeln!(
            self.file,
            "{},{},{:.6},{:.6e},{:.1},{:.2},{:.1},{:.1}",
            r.step,
            r.epoch + 1,
            r.loss,
            r.lr,
            r.ips,
            r.elapsed,
            r.ips_per_replica,
            r.reduce_ms
        )?;
        Ok(())
    }
}

/// The weights the run samples with by default (`sample_weights`): the
/// epoch previews and quality probes judge what `sample` and `eval` will
/// draw.
fn sampling_model<B: AutodiffBackend>(
    trainer: &Trainer<B, UNet<B>>,
    weights: Weights,
) -> UNet<B::InnerBackend> {
    match weights {
        Weights::Ema => trainer.ema().model.clone(),
        Weights::Model => trainer.model().valid(),
    }
}
