//! Checkpoints of a run ([`diffusion_train::checkpoint`]).

pub use diffusion_train::checkpoint::{latest, save_module, write, EMA, MODEL};
pub use diffusion_train::TrainState;
