//! Judging and drawing the samples of diffusion models on burn.
//!
//! - [`judge`]: the digit classifier that judges samples ([`Judge::load`],
//!   [`Judge::classify`]);
//! - [`generate`](mod@generate): seeded, labelled generation in batches over threads,
//!   for any [`diffusion_core::Denoiser`];
//! - [`score`](mod@score): accuracy, the confusion matrix and the Fréchet distance to
//!   a reference set ([`frechet`] holds the formula);
//! - [`probe`]: a small evaluation to run after each epoch of training;
//! - [`pictures`]: labelled grids as PNG and reverse trajectories as GIF.
//!
//! ```
//! use diffusion_eval::pictures::GridLayout;
//! // 4 grey 2x2 images in a 2x2 grid, each labelled with its class.
//! let layout = GridLayout::new(4, 1, 2, 2);
//! let pixels = layout.render(&[0.0; 16], &[Some(0), Some(1), Some(2), None]);
//! let (w, h) = layout.size(4);
//! assert_eq!(pixels.len(), w * h);
//! ```

mod error;
mod font;
pub mod frechet;
pub mod generate;
pub mod judge;
pub mod pictures;
pub mod probe;
pub mod score;

pub use error::EvalError;
pub use generate::{generate, Generation};
pub use judge::{ClassifierInfo, Judge};
pub use probe::{Probe, ProbeResult};
pub use score::{score, Reference, Scores};
