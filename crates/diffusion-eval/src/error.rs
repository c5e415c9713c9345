//! What can go wrong while judging or drawing samples: one line each,
//! naming the file.

use std::path::PathBuf;

/// An evaluation or picture error.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The judge's files are missing or unreadable.
    #[error("{path}: {reason}")]
    Classifier {
        /// The file.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        reason: String,
    },
    /// A picture could not be written.
    #[error("writing {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The sampler's configuration does not fit the schedule.
    #[error(transparent)]
    Sampler(#[from] diffusion_core::CoreError),
    /// Asked for something that cannot be drawn or scored.
    #[error("{0}")]
    Invalid(String),
}
