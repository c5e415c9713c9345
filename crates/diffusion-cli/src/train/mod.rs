//! `diffusion train`: flags become a run; the library's loop (`diffusion_train::Fit`) trains it with this program's hooks (`hooks.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use diffusion_core::NoiseSchedule;
use diffusion_data::{BatchLoader, ImageSet};
use diffusion_model::UNet;
use diffusion_train::distributed::{self, Cluster};
use diffusion_train::{CheckpointError, Fit, FitConfig, FitError, RunLock, Start, Stop, Trainer};

use crate::backend::{dispatch, BackendKind, Task};
use crate::checkpoint;
use crate::config::RunConfig;

mod args;
mod hooks;
mod setup;

use args::{cluster_from, Student};
pub use args::{DistillArgs, TrainArgs};
use hooks::Hooks;
use setup::{lock_run, open_run, start_node, stop_on_signals, training_set};

/// `diffusion distill`: a `train` run whose configuration comes from the
/// teacher (`RunConfig::distilled`) and whose trainer has the teacher
/// attached; resumed like any run.
pub fn distill(args: DistillArgs) -> Result<i32> {
    let student = match (args.teacher, args.steps) {
        (Some(teacher), Some(steps)) => Some(Student { teacher, steps }),
        // --resume: the teacher is in the run's config.json.
        _ => None,
    };
    run(args.train, student)
}

pub fn run(args: TrainArgs, student: Option<Student>) -> Result<i32> {
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
    let (config, run_dir, resume, save_config) = open_run(&args, world, lead, student.as_ref())?;
    let lock = lock_run(&run_dir, lead, resume)?;
    let set = training_set(&config)?;
    if lead && !resume {
        config.save(&run_dir)?;
    }
    start_node(cluster.as_ref(), world)?;
    let interrupted = stop_on_signals();
    let what = match &config.distill {
        Some(d) => format!(
            "distilling {} into {} steps",
            d.teacher.display(),
            config.sampler.steps
        ),
        None => format!("training {:?} preset", config.preset),
    };
    eprintln!(
        "{what} on {} {} images ({}), backend {}, into {}",
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
        let loader = BatchLoader::new(set, tc.batch_size, tc.trainer.seed, tc.workers);
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
                let recipe = config.recipe(total);
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
            if config.distill.is_some() {
                "distill"
            } else {
                "train"
            },
        );
        Ok(if interrupted.load(Ordering::SeqCst) {
            130
        } else {
            0
        })
    }
}

/// One trainer of the U-Net per device.
type Trainers<B> = Vec<Trainer<B, UNet<B>>>;

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
) -> Result<Option<Trainers<B>>> {
    // Every replica starts from the same weights: the same seeded
    // initialisation, or the same checkpoint. Built here in turn (the
    // initialisation draws from the backend's generator).
    let mut trainers = Vec::with_capacity(devices.len());
    let mut start = Start::Fresh;
    for device in devices {
        let mut trainer = diffusion_train::build_trainer::<B>(config, device, total, cpu)?;
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
    command: &str,
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
            "stopped at step {}; checkpoint saved. Continue with: cargo xtask {command} --resume {}",
            outcome.state.step,
            run_dir.display()
        ),
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

/// The error for a NaN or infinite loss: what happened, what was kept,
/// what to change.
fn non_finite(loss: f64, step: u64, config: &RunConfig, run_dir: &Path) -> anyhow::Error {
    let kept = match checkpoint::latest(run_dir) {
        Ok((_, s)) => format!("the last good checkpoint (step {}) stays latest", s.step),
        Err(_) => "no checkpoint was written".to_string(),
    };
    anyhow::anyhow!(
        "the loss became {loss} by step {step}; nothing of this state was saved and {kept}. Lower the learning rate (lr {} in {}) or add --warmup-steps, then train again (--resume continues from the last checkpoint)",
        config.train.trainer.lr,
        run_dir.join(crate::config::CONFIG_FILE).display()
    )
}
