//! MNIST-format image data for diffusion training: reading and checking
//! IDX files, downloading named data sets, and a prefetching batch loader
//! that turns them into [burn] tensors.
//!
//! Every function takes the folder to read; [`default_dir`] says where a
//! named data set lives when you have no folder of your own (the
//! `DIFFUSION_DATA_DIR` environment variable, else a per-user cache
//! folder), and [`download()`] fetches a missing one from its mirrors. Any
//! directory of IDX files in the MNIST layout loads too.
//!
//! ```
//! use std::sync::Arc;
//! use burn::backend::Flex;
//! use diffusion_data::{load_split, BatchLoader, DatasetName, Split};
//!
//! // A folder holding MNIST's four IDX files: here the copy this repository
//! // bundles; elsewhere `diffusion_data::default_dir(DatasetName::Mnist)`
//! // after `diffusion_data::download`.
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
//! // Read and verify the MNIST test split (10,000 images).
//! let set = load_split(&dir, Split::Test)?;
//! assert_eq!(set.known, Some(DatasetName::Mnist));
//! assert_eq!((set.len, set.height, set.width, set.num_classes), (10_000, 28, 28, 10));
//!
//! // Shuffled batches of 64 from seed 7, two threads preparing them ahead.
//! let loader = BatchLoader::new(Arc::new(set), 64, 7, 2);
//! let first = loader.epoch(0, 0).next().unwrap();
//! let batch = first.to_device::<Flex>(&Default::default());
//! assert_eq!(batch.images.dims(), [64, 1, 28, 28]); // values in [-1, 1]
//! assert_eq!(batch.labels.dims(), [64]);
//! # Ok::<(), diffusion_data::DataError>(())
//! ```
//!
//! Modules, one concept each: [`idx`] (one IDX file: header, length,
//! gzip, SHA-256), [`known`] (the checksums of the known data sets),
//! [`name`] (data set names, splits, file names), [`image_set`] (a split in
//! memory and loading it), [`location`] (where data lives), [`mod@download`]
//! (mirrors), [`shuffle`] (the reproducible order), [`batch`] (host and
//! device batches), [`loader`] (epochs of batches from worker threads), and
//! [`error`].
//!
//! Invariants: no function here panics on bad input files, every error is
//! a [`DataError`] whose message is one line naming the file and the fix;
//! checksums are of the uncompressed bytes; the batch order depends only on
//! `(seed, epoch)`, never on thread timing; no backend is named outside
//! tests.

pub mod batch;
pub mod download;
pub mod error;
pub mod idx;
pub mod image_set;
pub mod known;
pub mod loader;
pub mod location;
pub mod name;
pub mod shuffle;

#[cfg(test)]
pub(crate) mod test_util;

pub use batch::{Batch, HostBatch};
pub use download::{canonical_mirrors, download, DownloadEvent, DownloadProgress};
pub use error::DataError;
pub use image_set::{is_present, load_named, load_split, ImageSet};
pub use loader::{BatchLoader, Epoch};
pub use location::{data_root, default_dir, DATA_DIR_ENV};
pub use name::{DatasetName, FileKind, Split};
