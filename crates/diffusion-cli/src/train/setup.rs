//! Opening a run: its configuration and directory, the lock, the data,
//! the node's part in a multi-node run, the stop signals.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use diffusion_data::{ImageSet, Split};
use diffusion_train::distributed::{parse_host_port, start_orchestrator, Cluster};
use diffusion_train::RunLock;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::data::{self};

use super::args::{configure, Student, TrainArgs};

/// The run's configuration and directory: a new one from the flags, or the
/// one `--resume` names (with `--epochs` and the world size it may change).
/// Also whether config.json must be rewritten once the resume succeeds.
pub(super) fn open_run(
    args: &TrainArgs,
    world: usize,
    lead: bool,
    student: Option<&Student>,
) -> Result<(RunConfig, PathBuf, bool, bool)> {
    let (mut config, run_dir, resume) = match &args.resume {
        Some(dir) => (RunConfig::load(dir)?, dir.clone(), true),
        None => {
            let config = configure(args, world, student)?;
            let default = match student {
                Some(s) => format!("distilled-{}", s.steps),
                None => format!("{:?}", args.preset).to_lowercase(),
            };
            let run_dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(default));
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
pub(super) fn lock_run(run_dir: &Path, lead: bool, resume: bool) -> Result<Option<RunLock>> {
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
pub(super) fn training_set(config: &RunConfig) -> Result<ImageSet> {
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
pub(super) fn start_node(cluster: Option<&Cluster>, world: usize) -> Result<()> {
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
pub(super) fn stop_on_signals() -> Arc<AtomicBool> {
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

pub(super) fn check_data_fits(config: &RunConfig, set: &ImageSet) -> Result<()> {
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
