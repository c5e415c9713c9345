//! Training for diffusion models on burn: everything a real run needs
//! beyond the model and the data, generic over the backend and the model.
//!
//! - [`Trainer`]: owns the model, Adam, the EMA of the weights, the step
//!   counter and the random state; [`Trainer::step`] draws t, ε and label
//!   drops ([`diffusion_core::Objective`]), runs forward and backward
//!   (split over threads with [`shard::sharded_gradients`] when asked),
//!   steps Adam at the scheduled learning rate ([`LrSchedule`]) and
//!   updates the EMA.
//! - [`checkpoint`]: one record of model, EMA, optimizer and state per
//!   checkpoint, written atomically; [`Trainer::save`] and
//!   [`Trainer::resume`] give a run that resumes bit for bit; typed errors
//!   ([`CheckpointError`]).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::{Int, Tensor};
//! use diffusion_core::NoiseSchedule;
//! use diffusion_model::UNetConfig;
//! use diffusion_train::{Trainer, TrainerConfig};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let unet = UNetConfig::new()
//!     .with_widths(vec![8, 16])
//!     .with_strides(vec![2])
//!     .with_up_widths(vec![8])
//!     .with_attention(vec![false, true])
//!     .with_image_size(8)
//!     .init_seeded::<B>(&device, 0)
//!     .unwrap();
//! let mut trainer = Trainer::new(unet, &NoiseSchedule::reference(), TrainerConfig::new(2), &device);
//! let x0 = Tensor::<B, 4>::zeros([4, 1, 8, 8], &device);
//! let labels = Tensor::<B, 1, Int>::from_ints([0, 1, 2, 3], &device);
//! let out = trainer.step(x0, Some(labels));
//! assert!(out.loss.into_scalar() > 0.0);
//! assert_eq!(trainer.state().step, 1);
//! ```
//!
//! Invariants: no backend is named outside tests and examples; a step's
//! random draws depend only on `(seed, step)`; a checkpoint on disk is
//! either complete and pointed at by `latest.json`, or not pointed at.

pub mod atomic;
pub mod checkpoint;
pub mod csv_log;
pub mod distill;
#[cfg(feature = "collective")]
pub mod distributed;
pub mod ema;
pub mod fit;
pub mod kernels;
pub mod lock;
pub mod lr;
pub mod optim;
/// What a module's parameters are (moved to `diffusion_model::params`).
pub use diffusion_model::params;
pub mod run;
pub mod shard;
pub mod trainer;

pub use checkpoint::{CheckpointError, TrainState};
pub use csv_log::CsvLog;
pub use ema::{Ema, EmaConfig};
pub use fit::{
    EpochEnd, Fit, FitConfig, FitError, FitObserver, HookError, LogEvent, OnLog, Outcome, Start, Stop,
};
pub use lock::{LockError, RunLock};
pub use lr::LrSchedule;
pub use optim::{clip_global_norm, FusedAdam, OptimizerKind, TrainerOptimizer};
pub use run::{build_trainer, Run, RunConfig, RunError};
pub use trainer::{BatchPart, GradientSync, StepOutput, Trainer, TrainerConfig};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
