//! `diffusion train`'s flags and the run configuration they make.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use diffusion_core::Prediction;
use diffusion_train::distributed::{parse_host_port, Cluster, Nodes};

use crate::config::{Preset, RunConfig};
use crate::data::DatasetArg;

use crate::backend::BackendKind;

/// `diffusion train` flags. Flags left out take the preset's value.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Starting configuration: seed (the reference run), quick (5-10 min on
    /// a 2-core CPU), full (the best digits in 40-70 min on 2 cores), tiny
    /// (seconds, for tests).
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Preset,
    /// Run directory to create (default: runs/PRESET).
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
    /// The optimizer: adam (the reference's) or adamw (with --weight-decay).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// AdamW's decoupled weight decay (default 0.01; needs --optimizer adamw).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the gradients' global L2 norm to this before each step (1.0 is
    /// common for diffusion models; default: no clipping).
    #[arg(long, value_name = "NORM")]
    pub grad_clip: Option<f64>,
    /// Save a checkpoint every N steps (0 = only at epoch ends).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Threads preparing batches.
    #[arg(long)]
    pub workers: Option<usize>,
    /// On the CPU backend, split each batch into N pieces computed in
    /// parallel threads (the same gradient to float rounding). The presets
    /// take 1: with the CPU kernels one batch keeps the cores busy (seed
    /// preset on 2 cores: 138 to 148 img/s with 1, 132 to 135 with 2).
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

/// `diffusion distill` flags: the teacher, the student's steps, and the
/// training flags of `train` (the preset's are not used: the student
/// starts from the teacher's configuration).
#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// The run to distil (a finished `train` or `distill` run).
    #[arg(
        long,
        value_name = "RUN_DIR",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    pub teacher: Option<PathBuf>,
    /// The student's sampling steps; the teacher takes twice as many.
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The data-parallel layout asked for by the flags (`None`: one device).
pub(super) fn cluster_from(args: &TrainArgs) -> Result<Option<Cluster>> {
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
pub enum OptimizerArg {
    Adam,
    Adamw,
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
            PredictionArg::X0 => Prediction::X0,
            PredictionArg::V => Prediction::V,
        }
    }
}

/// A distillation's teacher and the student's steps.
#[derive(Debug, Clone)]
pub struct Student {
    pub teacher: PathBuf,
    pub steps: usize,
}

/// Builds the run's configuration from the preset (or, for a student,
/// from its teacher's configuration) and the flags.
pub(super) fn configure(args: &TrainArgs, world: usize, student: Option<&Student>) -> Result<RunConfig> {
    let mut c = match student {
        None => RunConfig::preset(args.preset),
        Some(s) => {
            let teacher = RunConfig::load(&s.teacher)?;
            RunConfig::distilled(&s.teacher, &teacher, s.steps)
                .map_err(|e| anyhow::anyhow!("--steps: {e}"))?
        }
    };
    c.train.world_size = world;
    let t = &mut c.train;
    if let Some(d) = args.dataset {
        t.dataset = d.into();
    }
    if args.data_dir.is_some() || student.is_none() {
        t.data_dir = args.data_dir.clone();
    }
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
    set!(t.checkpoint_every, args.checkpoint_every);
    set!(t.workers, args.workers);
    if args.limit.is_some() {
        t.limit = args.limit;
    }
    let t = &mut t.trainer;
    set!(t.lr, args.lr);
    set!(t.seed, args.seed);
    set!(t.lr_schedule.warmup_steps, args.warmup_steps);
    set!(t.lr_schedule.cosine_decay, args.cosine_decay);
    set!(t.ema.decay, args.ema_decay);
    set!(t.objective.label_dropout, args.label_dropout);
    set!(t.shards, args.shards);
    if let Some(g) = args.min_snr_gamma {
        if !(g > 0.0 && g.is_finite()) {
            bail!("--min-snr-gamma must be a positive number, got {g}");
        }
        t.objective.weighting = diffusion_core::LossWeighting::MinSnr { gamma: g };
    }
    t.optimizer = match (args.optimizer, args.weight_decay) {
        (Some(OptimizerArg::Adamw), w) => diffusion_train::OptimizerKind::AdamW {
            weight_decay: w.unwrap_or(0.01),
        },
        (_, Some(_)) => bail!("--weight-decay needs --optimizer adamw (Adam has no decoupled decay)"),
        (Some(OptimizerArg::Adam) | None, None) => diffusion_train::OptimizerKind::Adam,
    };
    if args.grad_clip.is_some() {
        t.grad_clip = args.grad_clip;
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
            c.preview.quality = Some(crate::config::QualityProbe { per_class: n });
        }
        None => {}
    }
    c.validate()?;
    Ok(c)
}
