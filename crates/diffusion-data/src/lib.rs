//! MNIST-format image data for diffusion training: reading and checking
//! IDX files, downloading named data sets, and a prefetching batch loader
//! that turns them into [burn] tensors.
//!
//! MNIST is bundled in the repository (`data/mnist`), so a fresh clone
//! trains offline. Fashion-MNIST, or any directory of IDX files in the same
//! layout, is read from a folder you name; [`download()`] fetches a named data
//! set that is missing.
//!
//! ```
//! use std::sync::Arc;
//! use burn::backend::Flex;
//! use diffusion_data::{bundled_mnist_dir, load_split, BatchLoader, DatasetName, Split};
//!
//! // Read and verify the bundled MNIST test split (10,000 images).
//! let set = load_split(&bundled_mnist_dir(), Split::Test)?;
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
pub use location::{bundled_mnist_dir, default_dir, shared_data_dir, workspace_dir};
pub use name::{DatasetName, FileKind, Split};
