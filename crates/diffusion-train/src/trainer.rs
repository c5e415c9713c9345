//! The trainer: model, Adam, EMA, step counter and random state, with a
//! step that returns the loss and checkpoints that resume exactly.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor};
use diffusion_core::rng::{mix_seed, with_backend_seed};
use diffusion_core::{BatchDenoiser, ForwardProcess, NoiseSchedule, Objective};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointError, TrainState};
use crate::distill::{self, Teacher};
use crate::ema::{Ema, EmaConfig};
use crate::lr::LrSchedule;
use crate::optim::{clip_global_norm, OptimizerKind, TrainerOptimizer};
use crate::shard::sharded_gradients;

/// Everything a [`Trainer`] needs to know besides the model and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Peak learning rate of Adam.
    pub lr: f64,
    /// Warm-up and decay of the learning rate.
    pub lr_schedule: LrSchedule,
    /// Adam's ε (PyTorch's 1e-8; burn's default is 1e-5).
    pub adam_epsilon: f64,
    /// Seed of the per-step draws (t, ε, label drops).
    pub seed: u64,
    /// The loss.
    pub objective: Objective,
    /// Averaging of the weights.
    pub ema: EmaConfig,
    /// Pieces each batch is split into and run in parallel threads (1 =
    /// none); the gradient is that of the whole batch either way.
    pub shards: usize,
    /// Steps of the whole run (where the learning-rate decay ends). Not
    /// written when 0, as in a run's `config.json`, where the loop derives
    /// it from the epochs and the data when the run starts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total_steps: u64,
    /// The optimizer (Adam unless set; its ε is `adam_epsilon`).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Clip the gradients' global L2 norm to this before each step
    /// (`None`: no clipping; 1.0 is common for diffusion models).
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TrainerConfig {
    /// The reference's settings (Adam 1e-3 constant, ε 1e-8, plain ε-MSE,
    /// EMA 0.999 with warm-up, seed 0, no sharding) for a run of
    /// `total_steps` steps.
    pub fn new(total_steps: u64) -> Self {
        Self {
            lr: 1e-3,
            lr_schedule: LrSchedule::constant(),
            adam_epsilon: 1e-8,
            seed: 0,
            objective: Objective::default(),
            ema: EmaConfig::default(),
            shards: 1,
            total_steps,
            optimizer: OptimizerKind::Adam,
            grad_clip: None,
        }
    }
}

/// Where one replica's samples sit in the global batch of a
/// data-parallel step (see [`Trainer::step_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPart {
    /// Index of this replica's first sample in the global batch.
    pub offset: usize,
    /// Samples in the global batch (all replicas together).
    pub global: usize,
}

/// Averages gradients over data-parallel replicas between backward and
/// the optimizer step (`diffusion_train::distributed::Replica` does it
/// with burn's collective all-reduce; a lone trainer does nothing).
pub trait GradientSync<B: AutodiffBackend> {
    /// Why averaging failed (a peer lost, a timeout).
    type Error;

    /// Replaces this replica's gradients of `model` and its mean loss by
    /// their means over all replicas (every replica must call this once
    /// per step, with the same model layout).
    fn average<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
        loss: Tensor<B::InnerBackend, 1>,
    ) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>), Self::Error>;
}

/// The one-replica [`GradientSync`]: the gradients are already the mean.
pub(crate) struct Alone;

impl<B: AutodiffBackend> GradientSync<B> for Alone {
    type Error = std::convert::Infallible;

    fn average<M: AutodiffModule<B>>(
        &mut self,
        _: &M,
        grads: GradientsParams,
        loss: Tensor<B::InnerBackend, 1>,
    ) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>), Self::Error> {
        Ok((grads, loss))
    }
}

/// What a step returns.
#[derive(Debug, Clone)]
pub struct StepOutput<B: AutodiffBackend> {
    /// The batch's mean loss, left on the device (reading it back waits
    /// for the device, so callers do that only when they log).
    pub loss: Tensor<B::InnerBackend, 1>,
    /// The learning rate the step used.
    pub lr: f64,
}

/// Trains a denoiser `M` (any [`AutodiffModule`] that is a
/// [`BatchDenoiser`], such as `diffusion_model::UNet`).
///
/// The random state is the config's seed and the step counter: step `k`
/// seeds the backend's generator with `mix_seed(seed, k)` before drawing,
/// so a resumed run draws exactly what an uninterrupted one would.
pub struct Trainer<B: AutodiffBackend, M: AutodiffModule<B>> {
    /// The model; `None` only inside [`Trainer::step_part`]'s optimizer
    /// step, which takes it so that the optimizer holds the only reference
    /// to its weights (and can update them in place).
    model: Option<M>,
    optim: Box<dyn TrainerOptimizer<M, B>>,
    ema: Ema<M::InnerModule>,
    state: TrainState,
    config: TrainerConfig,
    fp: ForwardProcess<B>,
    num_steps: usize,
    device: B::Device,
    /// Σ loss of the steps since the last finiteness check (on the device).
    unchecked: Option<Tensor<B::InnerBackend, 1>>,
    /// A teacher to distill (see [`crate::distill`]); `None` trains on the
    /// objective.
    teacher: Option<Box<dyn Teacher<B::InnerBackend>>>,
}

impl<B, M> Trainer<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + BatchDenoiser<B>,
{
    /// A trainer at step 0 for `model`, with noise `schedule`.
    pub fn new(model: M, schedule: &NoiseSchedule, config: TrainerConfig, device: &B::Device) -> Self
    where
        M: 'static,
    {
        let optim = config.optimizer.build::<B, M>(config.adam_epsilon);
        Self::with_boxed(model, schedule, config, optim, device)
    }

    /// A trainer with an optimizer of your own (any of burn's; `config`'s
    /// `optimizer` and `adam_epsilon` are then not used). Its state is
    /// saved in checkpoints and restored by [`Trainer::resume`] like Adam's.
    pub fn with_optimizer(
        model: M,
        schedule: &NoiseSchedule,
        config: TrainerConfig,
        optimizer: impl Optimizer<M, B> + 'static,
        device: &B::Device,
    ) -> Self {
        Self::with_boxed(model, schedule, config, Box::new(optimizer), device)
    }

    fn with_boxed(
        model: M,
        schedule: &NoiseSchedule,
        config: TrainerConfig,
        optim: Box<dyn TrainerOptimizer<M, B>>,
        device: &B::Device,
    ) -> Self {
        let ema = Ema::new(model.valid(), config.ema);
        Self {
            model: Some(model),
            optim,
            ema,
            state: TrainState::start(),
            fp: ForwardProcess::new(schedule, device),
            num_steps: schedule.num_steps(),
            config,
            device: device.clone(),
            unchecked: None,
            teacher: None,
        }
    }

    /// Trains the model as a student of `teacher` (progressive
    /// distillation, [`crate::distill`]): each step draws ε and the
    /// labels as usual, the teacher turns them into a lesson (inputs and
    /// targets, without gradients), and the loss is the model's mean
    /// squared error to the targets. The teacher is not part of a
    /// checkpoint: attach the same one again before resuming.
    pub fn with_teacher(mut self, teacher: impl Teacher<B::InnerBackend> + 'static) -> Self {
        self.teacher = Some(Box::new(teacher));
        self
    }

    /// One optimizer step on clean data `x0` ([B, C, H, W]) with optional
    /// labels (`[B]`): draws t, ε and label drops, computes the loss and its
    /// gradient (over `shards` threads), steps Adam at the scheduled
    /// learning rate and updates the EMA.
    pub fn step(&mut self, x0: Tensor<B, 4>, labels: Option<Tensor<B, 1, Int>>) -> StepOutput<B> {
        let n = x0.dims()[0];
        let part = BatchPart { offset: 0, global: n };
        match self.step_part(x0, labels, part, &mut Alone) {
            Ok(out) => out,
            Err(never) => match never {},
        }
    }

    /// One data-parallel step: `x0` and `labels` are samples
    /// `[part.offset, part.offset + len)` of a global batch of
    /// `part.global`, spread over replicas that each hold a trainer in the
    /// same state. This replica draws its share of t, ε and label drops
    /// ([`Objective::draw_part`]), computes the gradient of its mean loss,
    /// and `sync` replaces it by the replicas' average before Adam steps;
    /// every replica then takes the same step. With one replica and
    /// `part = 0..n of n` this is [`Trainer::step`].
    pub fn step_part<S: GradientSync<B>>(
        &mut self,
        x0: Tensor<B, 4>,
        labels: Option<Tensor<B, 1, Int>>,
        part: BatchPart,
        sync: &mut S,
    ) -> Result<StepOutput<B>, S::Error> {
        let objective = self.config.objective;
        // The generator may be shared by replicas in other threads:
        // seeding and drawing happen under one lock.
        let seed = mix_seed(self.config.seed, self.state.step);
        let batch = with_backend_seed::<B, _>(&self.device, seed, || {
            objective.draw_part(x0, labels, self.num_steps, part.offset, part.global)
        });
        let n = batch.len();
        let fp = &self.fp;
        let lesson = self
            .teacher
            .as_deref()
            .map(|teacher| distill::lesson_on(teacher, &batch, part, self.model().prediction()));
        let (grads, loss) = sharded_gradients(self.model(), n, self.config.shards, |model: &M, range| {
            let whole = range.len() == n;
            match &lesson {
                Some(l) if whole => l.loss(model),
                Some(l) => l.narrow(range.start, range.len()).loss(model),
                None if whole => objective.loss(model, fp, batch.clone()),
                None => objective.loss(model, fp, batch.narrow(range.start, range.len())),
            }
        });
        let (grads, loss) = sync.average(self.model(), grads, loss)?;
        let lr = self.lr_at(self.state.step);
        let grads = match self.config.grad_clip {
            Some(max) => clip_global_norm::<B, M>(self.model(), grads, max).0,
            None => grads,
        };
        // Taken, not cloned: a clone would share every weight's buffer, and
        // an optimizer kernel that updates in place would have to copy it.
        let model = self
            .model
            .take()
            .expect("the trainer's model is in place between steps");
        let model = self.optim.step(lr, model, grads);
        self.ema.update(&model.valid());
        self.model = Some(model);
        self.state.step += 1;
        self.state.batch_in_epoch += 1;
        self.state.ema_updates = self.ema.updates;
        self.unchecked = Some(match self.unchecked.take() {
            Some(sum) => sum + loss.clone(),
            None => loss.clone(),
        });
        Ok(StepOutput { loss, lr })
    }

    /// Checks that every loss since the last check was finite (reads one
    /// number back from the device). [`Trainer::save`] calls it first, so a
    /// state reached through a NaN or infinite loss is never saved.
    pub fn check_finite(&mut self) -> Result<(), CheckpointError> {
        match self.take_loss_sum() {
            Some(loss) if !loss.is_finite() => Err(CheckpointError::NonFiniteLoss {
                step: self.state.step,
                loss,
            }),
            _ => Ok(()),
        }
    }

    /// The sum of the losses since the last check, read back from the
    /// device (`None` when no step was taken since). A non-finite sum is
    /// kept, so this state stays unsaveable.
    pub(crate) fn take_loss_sum(&mut self) -> Option<f64> {
        let sum: f64 = self.unchecked.take()?.into_scalar().elem();
        if !sum.is_finite() {
            self.unchecked = Some(Tensor::from_floats([sum as f32], &self.device));
        }
        Some(sum)
    }

    /// The learning rate of step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.config
            .lr_schedule
            .at(self.config.lr, step, self.config.total_steps)
    }

    /// Marks the end of an epoch (`finished` when it was the last); only
    /// [`crate::Fit`] does, so the epoch count matches the data order.
    pub(crate) fn end_epoch(&mut self, finished: bool) {
        self.state.epoch += 1;
        self.state.batch_in_epoch = 0;
        self.state.finished = finished;
    }

    /// Lets training continue past a finished run (for more epochs).
    pub(crate) fn reopen(&mut self) {
        self.state.finished = false;
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        self.model
            .as_ref()
            .expect("the trainer's model is in place between steps")
    }

    /// The averaged weights (on the inner backend, ready to sample).
    pub fn ema(&self) -> &Ema<M::InnerModule> {
        &self.ema
    }

    /// Where training stands.
    pub fn state(&self) -> TrainState {
        self.state
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Changes the run's length (extending a run by more epochs); the
    /// learning-rate schedule follows.
    pub fn set_total_steps(&mut self, total: u64) {
        self.config.total_steps = total;
    }

    /// Writes a checkpoint of the current state into `run_dir`
    /// (see [`crate::checkpoint`]) and returns its folder; refuses (with
    /// [`CheckpointError::NonFiniteLoss`]) when a loss since the last check
    /// was NaN or infinite.
    pub fn save(&mut self, run_dir: &Path) -> Result<PathBuf, CheckpointError> {
        self.check_finite()?;
        checkpoint::write(run_dir, self.state, |dir| {
            checkpoint::save_module(self.model().clone(), &dir.join(checkpoint::MODEL))?;
            checkpoint::save_module(self.ema.model.clone(), &dir.join(checkpoint::EMA))?;
            self.optim.save(&dir.join(checkpoint::OPTIMIZER))
        })
    }

    /// Loads the newest checkpoint of `run_dir` (model, EMA, optimizer,
    /// state), so the next step is the one an uninterrupted run would take.
    pub fn resume(&mut self, run_dir: &Path) -> Result<TrainState, CheckpointError> {
        let (dir, state) = checkpoint::latest(run_dir)?;
        let model =
            checkpoint::load_module(self.model().clone(), &dir.join(checkpoint::MODEL), &self.device)?;
        let ema = checkpoint::load_module(self.ema.model.clone(), &dir.join(checkpoint::EMA), &self.device)?;
        self.optim.load(&dir.join(checkpoint::OPTIMIZER), &self.device)?;
        self.model = Some(model);
        self.ema.model = ema;
        self.ema.updates = state.ema_updates;
        self.state = state;
        self.unchecked = None;
        Ok(state)
    }
}
