//! The training loop: epochs over a [`BatchLoader`], exact resume,
//! checkpoints by policy, a stop flag and a step limit, non-finite losses
//! refused, and hooks ([`FitObserver`]) for everything a program shows or
//! writes around it (progress, metrics files, previews, probes).
//!
//! ```no_run
//! # use burn::backend::{Autodiff, Flex};
//! # use diffusion_train::{Fit, FitConfig, Trainer};
//! # fn demo(mut trainer: Trainer<Autodiff<Flex>, diffusion_model::UNet<Autodiff<Flex>>>,
//! #         loader: diffusion_data::BatchLoader) -> Result<(), diffusion_train::FitError> {
//! let fit = Fit::new("runs/mine", FitConfig::new(10));
//! fit.open(&mut trainer)?; // resumes from the run's latest checkpoint, if any
//! let outcome = fit.run(&mut trainer, &loader, &Default::default(), &mut ())?;
//! println!("stopped at step {}", outcome.state.step);
//! # Ok(()) }
//! ```
//!
//! Epoch bookkeeping (which batch of which epoch comes next, whether the
//! run is finished) lives in the [`TrainState`] that checkpoints record;
//! only this loop advances it, so a resumed run lands on the batch where
//! it stopped, bit for bit.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use diffusion_core::BatchDenoiser;
use diffusion_data::BatchLoader;

use crate::checkpoint::{CheckpointError, TrainState};
use crate::trainer::{Alone, BatchPart, GradientSync, Trainer};

/// What the loop does besides stepping: how long, how often it logs and
/// checkpoints, when it stops early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitConfig {
    /// Epochs in the whole run (a resumed run continues to this many).
    pub epochs: usize,
    /// Steps between [`FitObserver::on_log`] calls (the loss is read back
    /// from the device, and checked to be finite, only then). Every epoch's
    /// last step logs too.
    pub log_every: u64,
    /// Steps between checkpoints; 0 checkpoints only at epoch ends and on
    /// a stop.
    pub checkpoint_every: u64,
    /// Stop (with a checkpoint) once this many steps are done in all, as
    /// if interrupted.
    pub stop_after: Option<u64>,
    /// Whether the model takes the batches' labels.
    pub conditional: bool,
}

impl FitConfig {
    /// `epochs` epochs, a log every 50 steps, checkpoints at epoch ends,
    /// class-conditional.
    pub fn new(epochs: usize) -> Self {
        Self {
            epochs,
            log_every: 50,
            checkpoint_every: 0,
            stop_after: None,
            conditional: true,
        }
    }

    /// With a log every `steps` steps.
    pub fn with_log_every(self, steps: u64) -> Self {
        Self {
            log_every: steps,
            ..self
        }
    }

    /// With a checkpoint every `steps` steps (0: at epoch ends only).
    pub fn with_checkpoint_every(self, steps: u64) -> Self {
        Self {
            checkpoint_every: steps,
            ..self
        }
    }

    /// Stopping (with a checkpoint) once `steps` steps are done in all.
    pub fn with_stop_after(self, steps: Option<u64>) -> Self {
        Self {
            stop_after: steps,
            ..self
        }
    }

    /// For a model that takes no labels (`false`) or does.
    pub fn with_conditional(self, conditional: bool) -> Self {
        Self { conditional, ..self }
    }
}

/// How [`Fit::open`] found the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The run directory holds no checkpoint: training starts at step 0
    /// (a new run, or one stopped before its first checkpoint).
    Fresh,
    /// Resumed from the latest checkpoint, at this state.
    Resumed(TrainState),
    /// The latest checkpoint has every epoch of [`FitConfig::epochs`]
    /// done: [`Fit::run`] returns at once.
    Finished(TrainState),
}

/// Why [`Fit::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every epoch done.
    Finished,
    /// The stop flag was raised (on any replica), and a checkpoint saved.
    Requested,
    /// [`FitConfig::stop_after`] steps done, and a checkpoint saved.
    StepLimit,
}

/// What [`Fit::run`] ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Where training stands (the state the last checkpoint holds, unless
    /// the run had no checkpoint policy to honour).
    pub state: TrainState,
    /// Why it returned.
    pub stop: Stop,
}

/// A log point: the mean loss and speed since the previous one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogEvent {
    /// Steps done (the step just taken is `step`).
    pub step: u64,
    /// The epoch of that step, from 0.
    pub epoch: u64,
    /// Mean training loss over the steps since the last log point (all
    /// replicas' mean in data-parallel runs); finite.
    pub loss: f64,
    /// Steps the mean is over.
    pub steps: u64,
    /// The learning rate of the last step.
    pub lr: f64,
    /// Images per second since the last log point, all replicas together.
    pub images_per_s: f64,
    /// Replicas training together (1 on one device).
    pub world: usize,
    /// Mean time of a step's gradient all-reduce since the last log
    /// point, waiting for the slowest replica included (zero on one device).
    pub all_reduce: Duration,
}

/// An epoch's end, after its checkpoint was saved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochEnd {
    /// Epochs done (1 after the first).
    pub epochs_done: u64,
    /// Steps done.
    pub step: u64,
    /// Mean loss over this process's steps of the epoch; `None` for an
    /// epoch that was stopped at its very end and resumed.
    pub mean_loss: Option<f64>,
    /// Wall time since [`Fit::run`] started.
    pub elapsed: Duration,
}

/// The hooks of [`Fit::run`]; each may fail, which stops the run (with
/// the last checkpoint kept). `()` is the observer that does nothing.
/// In a data-parallel run only the lead replica (rank 0) calls them.
pub trait FitObserver<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// Before the first step of this process (after a resume, at its state).
    fn on_start(&mut self, _trainer: &Trainer<B, M>) -> Result<(), HookError> {
        Ok(())
    }
    /// After every step (keep it cheap: a progress bar's position).
    fn on_step(&mut self, _state: TrainState) {}
    /// Every [`FitConfig::log_every`] steps and at each epoch's last step.
    fn on_log(&mut self, _trainer: &Trainer<B, M>, _log: &LogEvent) -> Result<(), HookError> {
        Ok(())
    }
    /// At an epoch's end, after its checkpoint: previews, probes, plots.
    fn on_epoch_end(&mut self, _trainer: &Trainer<B, M>, _end: &EpochEnd) -> Result<(), HookError> {
        Ok(())
    }
    /// When the run stops early, after its checkpoint was saved.
    fn on_stop(&mut self, _trainer: &Trainer<B, M>, _stop: Stop) -> Result<(), HookError> {
        Ok(())
    }
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> FitObserver<B, M> for () {}

/// An observer that only logs: `OnLog(|log| println!("{}", log.loss))`.
pub struct OnLog<F>(pub F);

impl<B, M, F> FitObserver<B, M> for OnLog<F>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    F: FnMut(&LogEvent),
{
    fn on_log(&mut self, _: &Trainer<B, M>, log: &LogEvent) -> Result<(), HookError> {
        (self.0)(log);
        Ok(())
    }
}

/// An observer's error, passed through [`FitError::Hook`] unchanged.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Why [`Fit::run`] failed. The last checkpoint on disk stays intact in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// Saving or loading a checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The training loss became NaN or infinite; nothing of this state was
    /// saved.
    #[error("the loss became {loss} by step {step}")]
    NonFiniteLoss {
        /// Steps done when the loss was read.
        step: u64,
        /// The mean loss since the previous log point.
        loss: f64,
    },
    /// A data-parallel step could not reach the other replicas.
    #[cfg(feature = "collective")]
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistributedError),
    /// A replica's thread failed or panicked.
    #[error("replica {local}: {message}")]
    Replica {
        /// The replica's index in this process.
        local: usize,
        /// What went wrong.
        message: String,
    },
    /// An observer's hook failed.
    #[error(transparent)]
    Hook(HookError),
}

impl From<Infallible> for FitError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// The training loop of one run directory. Cheap to clone (the stop flag
/// is shared).
#[derive(Debug, Clone)]
pub struct Fit {
    run_dir: PathBuf,
    config: FitConfig,
    stop: Arc<AtomicBool>,
    #[cfg_attr(not(feature = "collective"), allow(dead_code))]
    replica_error: ReplicaErrorHook,
}

impl Fit {
    /// The loop of the run in `run_dir` (its checkpoints go to
    /// `run_dir/checkpoints`).
    pub fn new(run_dir: impl Into<PathBuf>, config: FitConfig) -> Self {
        Self {
            run_dir: run_dir.into(),
            config,
            stop: Arc::new(AtomicBool::new(false)),
            replica_error: ReplicaErrorHook::default(),
        }
    }

    /// Uses `flag` as the stop flag: raise it (from a signal handler, say)
    /// and the run saves a checkpoint after the current step and returns
    /// [`Stop::Requested`]. In a data-parallel run a flag raised on any
    /// replica stops all of them after the same step.
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = flag;
        self
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The loop's settings.
    pub fn config(&self) -> &FitConfig {
        &self.config
    }

    /// The stop flag (see [`Fit::with_stop_flag`]).
    pub fn stop_flag(&self) -> &Arc<AtomicBool> {
        &self.stop
    }

    /// Loads the run's latest checkpoint into `trainer`, if there is one.
    /// A run without checkpoints starts fresh; a damaged one is an error.
    /// Call it on every replica's trainer before [`Fit::run`].
    pub fn open<B, M>(&self, trainer: &mut Trainer<B, M>) -> Result<Start, FitError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + BatchDenoiser<B>,
    {
        match trainer.resume(&self.run_dir) {
            Err(CheckpointError::NotFound { .. }) => Ok(Start::Fresh),
            Err(e) => Err(e.into()),
            Ok(state) if state.finished && state.epoch as usize >= self.config.epochs => {
                Ok(Start::Finished(state))
            }
            Ok(state) => {
                // More epochs than the run was first given: not finished.
                trainer.reopen();
                Ok(Start::Resumed(state))
            }
        }
    }

    /// Trains `trainer` on `loader` to the end of [`FitConfig::epochs`], a
    /// stop or the step limit, from wherever its state stands.
    pub fn run<B, M, O>(
        &self,
        trainer: &mut Trainer<B, M>,
        loader: &BatchLoader,
        device: &B::Device,
        observer: &mut O,
    ) -> Result<Outcome, FitError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + BatchDenoiser<B>,
        O: FitObserver<B, M>,
    {
        self.drive(trainer, loader, device, &mut Alone, Role::Lead(observer))
    }

    /// The one loop, for one device and for every replica of a
    /// data-parallel run. The lead saves checkpoints and calls the hooks;
    /// followers only step.
    pub(crate) fn drive<B, M, S, O>(
        &self,
        trainer: &mut Trainer<B, M>,
        loader: &BatchLoader,
        device: &B::Device,
        sync: &mut S,
        mut role: Role<'_, O>,
    ) -> Result<Outcome, FitError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + BatchDenoiser<B>,
        S: LoopSync<B>,
        FitError: From<S::Error>,
        O: FitObserver<B, M>,
    {
        let c = self.config;
        let global = loader.batch_size();
        let per_epoch = loader.batches_per_epoch() as u64;
        let world = sync.world();
        if let Role::Lead(o) = &mut role {
            o.on_start(trainer).map_err(FitError::Hook)?;
        }
        let started = Instant::now();
        let mut window = Window::new();
        let mut epoch_loss = (0.0f64, 0u64);
        while (trainer.state().epoch as usize) < c.epochs {
            let epoch = trainer.state().epoch;
            for host in loader.epoch(epoch, trainer.state().batch_in_epoch as usize) {
                let batch = host.to_device::<B>(device);
                let n = batch.images.dims()[0] * world;
                let labels = c.conditional.then_some(batch.labels);
                sync.before_step(self.stop.load(Ordering::SeqCst));
                let part = sync.part(global);
                let out = trainer.step_part(batch.images, labels, part, sync)?;
                window.add(n, sync.all_reduce_time());
                let state = trainer.state();
                if let Role::Lead(o) = &mut role {
                    o.on_step(state);
                }
                if state.step.is_multiple_of(c.log_every.max(1)) || state.batch_in_epoch == per_epoch {
                    let sum = trainer.take_loss_sum();
                    let log = window.take(sum, state, epoch, out.lr, world)?;
                    epoch_loss.0 += log.loss * log.steps as f64;
                    epoch_loss.1 += log.steps;
                    if let Role::Lead(o) = &mut role {
                        o.on_log(trainer, &log).map_err(FitError::Hook)?;
                    }
                }
                let stop = if sync.stop_agreed(self.stop.load(Ordering::SeqCst)) {
                    Some(Stop::Requested)
                } else if c.stop_after.is_some_and(|s| state.step >= s) {
                    Some(Stop::StepLimit)
                } else {
                    None
                };
                let every = c.checkpoint_every > 0 && state.step.is_multiple_of(c.checkpoint_every);
                if let Role::Lead(o) = &mut role {
                    if stop.is_some() || every {
                        trainer.save(&self.run_dir)?;
                    }
                    if let Some(stop) = stop {
                        o.on_stop(trainer, stop).map_err(FitError::Hook)?;
                    }
                }
                if let Some(stop) = stop {
                    return Ok(Outcome { state, stop });
                }
            }
            trainer.end_epoch(epoch as usize + 1 >= c.epochs);
            if let Role::Lead(o) = &mut role {
                trainer.save(&self.run_dir)?;
                let end = EpochEnd {
                    epochs_done: trainer.state().epoch,
                    step: trainer.state().step,
                    mean_loss: (epoch_loss.1 > 0).then(|| epoch_loss.0 / epoch_loss.1 as f64),
                    elapsed: started.elapsed(),
                };
                o.on_epoch_end(trainer, &end).map_err(FitError::Hook)?;
            }
            epoch_loss = (0.0, 0);
        }
        Ok(Outcome {
            state: trainer.state(),
            stop: Stop::Finished,
        })
    }
}

/// Whether a replica writes (checkpoints, hooks) or only steps.
pub(crate) enum Role<'a, O> {
    Lead(&'a mut O),
    #[cfg_attr(not(feature = "collective"), allow(dead_code))]
    Follower,
}

/// What the loop needs of a step's gradient exchange beyond averaging:
/// the batch share, the stop agreement and the time spent.
pub(crate) trait LoopSync<B: AutodiffBackend>: GradientSync<B> {
    fn world(&self) -> usize;
    fn part(&self, global: usize) -> BatchPart;
    /// Called before each step with the local stop flag.
    fn before_step(&mut self, stop: bool);
    /// After the step: whether to stop now (the same answer on every replica).
    fn stop_agreed(&self, stop: bool) -> bool;
    fn all_reduce_time(&self) -> Option<Duration>;
}

/// One device: the whole batch, the local flag.
impl<B: AutodiffBackend> LoopSync<B> for Alone {
    fn world(&self) -> usize {
        1
    }
    fn part(&self, global: usize) -> BatchPart {
        BatchPart { offset: 0, global }
    }
    fn before_step(&mut self, _: bool) {}
    fn stop_agreed(&self, stop: bool) -> bool {
        stop
    }
    fn all_reduce_time(&self) -> Option<Duration> {
        None
    }
}

#[cfg(feature = "collective")]
impl<B: AutodiffBackend> LoopSync<B> for crate::distributed::Replica<B::InnerBackend> {
    fn world(&self) -> usize {
        self.world_size()
    }
    fn part(&self, global: usize) -> BatchPart {
        crate::distributed::Replica::part(self, global)
    }
    fn before_step(&mut self, stop: bool) {
        if stop {
            self.request_stop();
        }
    }
    fn stop_agreed(&self, _: bool) -> bool {
        crate::distributed::Replica::stop_agreed(self)
    }
    fn all_reduce_time(&self) -> Option<Duration> {
        Some(self.last_all_reduce())
    }
}

/// Steps, images and all-reduce time since the last log point (the
/// losses themselves stay on the device in the trainer until then: one
/// read-back per log point).
struct Window {
    steps: u64,
    images: u64,
    since: Instant,
    reduce: (Duration, u32),
}

impl Window {
    fn new() -> Self {
        Self {
            steps: 0,
            images: 0,
            since: Instant::now(),
            reduce: (Duration::ZERO, 0),
        }
    }

    fn add(&mut self, images: usize, reduce: Option<Duration>) {
        self.steps += 1;
        self.images += images as u64;
        if let Some(d) = reduce {
            self.reduce.0 += d;
            self.reduce.1 += 1;
        }
    }

    /// The log point's numbers from the sum of its losses; an error if
    /// their mean is not finite.
    fn take(
        &mut self,
        loss_sum: Option<f64>,
        state: TrainState,
        epoch: u64,
        lr: f64,
        world: usize,
    ) -> Result<LogEvent, FitError> {
        let loss = loss_sum.unwrap_or(0.0) / self.steps.max(1) as f64;
        if !loss.is_finite() {
            return Err(FitError::NonFiniteLoss {
                step: state.step,
                loss,
            });
        }
        let log = LogEvent {
            step: state.step,
            epoch,
            loss,
            steps: self.steps,
            lr,
            images_per_s: self.images as f64 / self.since.elapsed().as_secs_f64().max(1e-9),
            world,
            all_reduce: if self.reduce.1 > 0 {
                self.reduce.0 / self.reduce.1
            } else {
                Duration::ZERO
            },
        };
        *self = Self::new();
        Ok(log)
    }
}

/// Data-parallel training inside the same loop (feature `collective`).
#[cfg(feature = "collective")]
mod cluster {
    use super::*;
    use crate::distributed::{fingerprint, fingerprint_words, Cluster, Replica};

    impl Fit {
        /// Calls `hook` with a replica's error as soon as its thread fails
        /// (a program may print it and exit: the other replicas would
        /// otherwise wait for the failed one until the cluster's time limit).
        pub fn on_replica_error(mut self, hook: impl Fn(usize, &FitError) + Send + Sync + 'static) -> Self {
            self.replica_error = ReplicaErrorHook(Some(Arc::new(hook)));
            self
        }

        /// Trains this process's replicas of `cluster` in step: `trainers[k]`
        /// and `devices[k]` are local replica k, each built alike and passed
        /// through [`Fit::open`]. Replica 0 runs on this thread, the others
        /// on threads of their own. Every replica first joins the cluster
        /// and checks that all start from the same `recipe` (the caller's
        /// description of the run: configuration, data), step and weights.
        /// Each takes its share of every batch of `loader`, which yields the
        /// global batches; gradients are averaged every step, so the run
        /// trains as one device would. Only the lead (rank 0, on node 0)
        /// saves checkpoints and calls `observer`. Returns replica 0's outcome.
        pub fn run_cluster<B, M, O>(
            &self,
            cluster: &Cluster,
            trainers: &mut [Trainer<B, M>],
            devices: &[B::Device],
            loader: &BatchLoader,
            recipe: &[u8],
            observer: &mut O,
        ) -> Result<Outcome, FitError>
        where
            B: AutodiffBackend,
            M: AutodiffModule<B> + BatchDenoiser<B> + Send,
            O: FitObserver<B, M>,
        {
            let local = cluster.devices_per_node;
            if trainers.len() != local || devices.len() != local {
                return Err(FitError::Replica {
                    local: trainers.len().min(devices.len()),
                    message: format!(
                        "{} trainers and {} devices for {local} replicas per node",
                        trainers.len(),
                        devices.len()
                    ),
                });
            }
            let print = fingerprint(recipe, &trainers[0]);
            let (first, rest) = trainers.split_at_mut(1);
            std::thread::scope(|scope| {
                let mut handles = Vec::new();
                for (k, trainer) in rest.iter_mut().enumerate() {
                    let local = k + 1;
                    let device = devices[local].clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("diffusion-replica-{local}"))
                        .spawn_scoped(scope, move || {
                            let out = self.replica(
                                cluster,
                                local,
                                trainer,
                                &device,
                                loader,
                                print,
                                Role::<()>::Follower,
                            );
                            if let (Err(e), Some(hook)) = (&out, &self.replica_error.0) {
                                hook(local, e);
                            }
                            out
                        })
                        .map_err(|e| FitError::Replica {
                            local,
                            message: format!("cannot start its thread: {e}"),
                        })?;
                    handles.push((local, spawned));
                }
                let role = if cluster.is_lead_node() {
                    Role::Lead(observer)
                } else {
                    Role::Follower
                };
                let out = self.replica(cluster, 0, &mut first[0], &devices[0], loader, print, role);
                for (local, handle) in handles {
                    match handle.join() {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) if out.is_ok() => return Err(e),
                        Ok(Err(_)) => {}
                        Err(_) if out.is_ok() => {
                            return Err(FitError::Replica {
                                local,
                                message: "its thread panicked".into(),
                            })
                        }
                        Err(_) => {}
                    }
                }
                out
            })
        }

        /// One replica: join, agree, train its share, leave.
        #[allow(clippy::too_many_arguments)]
        fn replica<B, M, O>(
            &self,
            cluster: &Cluster,
            local: usize,
            trainer: &mut Trainer<B, M>,
            device: &B::Device,
            loader: &BatchLoader,
            print: u64,
            role: Role<'_, O>,
        ) -> Result<Outcome, FitError>
        where
            B: AutodiffBackend,
            M: AutodiffModule<B> + BatchDenoiser<B>,
            O: FitObserver<B, M>,
        {
            let mut replica = Replica::<B::InnerBackend>::join(cluster, local, device.clone())?;
            replica.agree(
                "configuration, step or weights",
                &fingerprint_words(print),
                device,
            )?;
            let part = loader.clone().part(replica.rank(), replica.world_size());
            let out = self.drive(trainer, &part, device, &mut replica, role);
            if out.is_ok() {
                // Every replica agreed to stop after this step and the lead
                // has saved: leaving only tells burn's orchestrator, which
                // may already be gone (node 0 exited first).
                let _ = replica.finish_within(Duration::from_secs(2));
            }
            out
        }
    }
}

/// What `Fit::on_replica_error` is given: called with the replica's
/// index and its error.
type ReplicaErrorFn = dyn Fn(usize, &FitError) + Send + Sync;

/// The hook `Fit::on_replica_error` installs.
#[derive(Clone, Default)]
pub(crate) struct ReplicaErrorHook(Option<Arc<ReplicaErrorFn>>);

impl std::fmt::Debug for ReplicaErrorHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(hook)" } else { "None" })
    }
}
