//! The one error type of this crate.
//!
//! Every message is a single line that starts with the file or directory at
//! fault and ends with what would fix it, so the CLI can print it as it is.

use std::io;
use std::path::PathBuf;

use crate::name::{DatasetName, FileKind};

/// What went wrong reading, checking or downloading a data set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// One of the four IDX files is missing (the others are there).
    #[error("{}: not found; {}", .path.display(), fetch_hint(*.dataset))]
    NotFound {
        /// The missing file (its stem plus `[.gz]` when either form would do).
        path: PathBuf,
        /// The named data set being read, if known; picks the hint in the message.
        dataset: Option<DatasetName>,
    },

    /// A directory with none of the IDX files in it, or no directory at all.
    #[error(
        "{}: {}; {}",
        .dir.display(),
        if *.dir_exists { "no IDX files here (expected train-images-idx3-ubyte[.gz] and the other three)" } else { "no such directory" },
        fetch_hint(*.dataset)
    )]
    NoData {
        /// The directory that was searched.
        dir: PathBuf,
        /// Whether `dir` exists (as a directory) at all.
        dir_exists: bool,
        /// The named data set being read, if known; picks the hint in the message.
        dataset: Option<DatasetName>,
    },

    /// The file exists but could not be read.
    #[error("{}: cannot read ({source}); check that the file is readable, or pass --data-dir DIR pointing at another copy", .path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// A gzip stream that stops before its end: a partial download or copy.
    #[error("{}: the gzip stream ends early (truncated, e.g. an interrupted download); delete the file and {}", .path.display(), refetch_hint(*.dataset))]
    TruncatedGzip {
        /// The truncated `.gz` file.
        path: PathBuf,
        /// The named data set being read, if known; picks the hint in the message.
        dataset: Option<DatasetName>,
    },

    /// A gzip stream with bad deflate data or a bad CRC.
    #[error("{}: corrupt gzip data ({reason}); delete the file and {}", .path.display(), refetch_hint(*.dataset))]
    CorruptGzip {
        /// The corrupt `.gz` file.
        path: PathBuf,
        /// The decoder's description of the fault.
        reason: String,
        /// The named data set being read, if known; picks the hint in the message.
        dataset: Option<DatasetName>,
    },

    /// The first bytes are not an IDX header for unsigned bytes.
    #[error(
        "{}: not an IDX file of unsigned bytes (magic number 0x{found:08x}, expected 0x{expected:08x} for {kind}); point --data-dir at a folder of MNIST-format IDX files",
        .path.display()
    )]
    BadMagic {
        /// The file at fault.
        path: PathBuf,
        /// Whether the file was read as images or labels.
        kind: FileKind,
        /// The big-endian 32-bit magic number in the file.
        found: u32,
        /// The magic number an IDX file of `kind` has (0x0803 or 0x0801).
        expected: u32,
    },

    /// An IDX header with the wrong number of dimensions for its role.
    #[error(
        "{}: the IDX header has {found} dimension(s) but {kind} files have {expected}; check that the images and labels files are not swapped or renamed",
        .path.display()
    )]
    WrongDimensions {
        /// The file at fault.
        path: PathBuf,
        /// Whether the file was read as images or labels.
        kind: FileKind,
        /// The number of dimensions the header declares.
        found: usize,
        /// The number `kind` requires (3 for images, 1 for labels).
        expected: usize,
    },

    /// The data after the header is shorter or longer than the header says
    /// (or the file ends inside the header; then the counts are of the
    /// header's bytes).
    #[error(
        "{}: {found} bytes where the IDX header calls for {expected} ({}); delete the file and {}",
        .path.display(),
        if .found < .expected { "the file is truncated" } else { "trailing bytes" },
        refetch_hint(*.dataset)
    )]
    LengthMismatch {
        /// The file at fault.
        path: PathBuf,
        /// Bytes the header calls for (or the header's own length).
        expected: u64,
        /// Bytes actually present.
        found: u64,
        /// The named data set being read, if known; picks the hint in the message.
        dataset: Option<DatasetName>,
    },

    /// The images file and the labels file of a split disagree on the count.
    #[error(
        "{}: {images_len} images, but {} has {labels_len} labels; replace them with an images/labels pair from the same data set and split",
        .images.display(),
        .labels.display()
    )]
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// The labels file.
        labels: PathBuf,
        /// Number of images in `images`.
        images_len: usize,
        /// Number of labels in `labels`.
        labels_len: usize,
    },

    /// A file of a named data set whose SHA-256 is not the published one.
    #[error(
        "{}: SHA-256 of the uncompressed data is {found}, not {dataset}'s {expected}; delete it and run `cargo xtask download {dataset}`, or pass its folder as --data-dir to read it as an unknown data set",
        .path.display()
    )]
    ChecksumMismatch {
        /// The file at fault.
        path: PathBuf,
        /// The data set the file was expected to belong to.
        dataset: DatasetName,
        /// The published SHA-256 of the uncompressed data, in hex.
        expected: String,
        /// The SHA-256 actually computed, in hex.
        found: String,
    },

    /// Images from one known data set with labels from another.
    #[error(
        "{}: these are {images_from} images, but {} holds {labels_from} labels; put the matching labels file beside the images",
        .images.display(),
        .labels.display()
    )]
    MixedDatasets {
        /// The images file.
        images: PathBuf,
        /// The labels file.
        labels: PathBuf,
        /// The data set the images file's checksum identifies.
        images_from: DatasetName,
        /// The data set the labels file's checksum identifies.
        labels_from: DatasetName,
    },

    /// Every mirror failed for one file.
    #[error(
        "{}: could not download {dataset} from any mirror ({}); check the network connection, or copy the file into that folder by hand",
        .path.display(),
        if .attempts.is_empty() { "no mirrors given".to_string() } else { .attempts.join("; ") }
    )]
    Download {
        /// Where the file would have been written.
        path: PathBuf,
        /// The data set being downloaded.
        dataset: DatasetName,
        /// One `url: reason` entry per mirror tried, in order.
        attempts: Vec<String>,
    },

    /// A data set name that is neither `mnist` nor `fashion-mnist`.
    #[error("unknown data set `{name}`; known data sets: mnist, fashion-mnist (or pass --data-dir DIR with IDX files)")]
    UnknownDataset {
        /// The name as given.
        name: String,
    },
}

impl DataError {
    /// The same error, now attributed to data set `name` (so that its hint
    /// names the right download command).
    pub(crate) fn for_dataset(mut self, name: DatasetName) -> Self {
        match &mut self {
            DataError::NotFound { dataset, .. }
            | DataError::NoData { dataset, .. }
            | DataError::TruncatedGzip { dataset, .. }
            | DataError::CorruptGzip { dataset, .. }
            | DataError::LengthMismatch { dataset, .. } => *dataset = Some(name),
            _ => {}
        }
        self
    }
}

/// What to do when a data set's files are not there.
fn fetch_hint(dataset: Option<DatasetName>) -> String {
    match dataset {
        Some(DatasetName::Mnist) => "pass --data-dir DIR pointing at a folder with the four MNIST IDX files, or run `cargo xtask download mnist`".into(),
        Some(DatasetName::FashionMnist) => "pass --data-dir DIR pointing at a folder with the four Fashion-MNIST IDX files, or run `cargo xtask download fashion-mnist`".into(),
        None => "pass --data-dir DIR pointing at a folder with the four IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte, optionally .gz), or run `cargo xtask download mnist` (or fashion-mnist)".into(),
    }
}

/// What to do after deleting a damaged file.
fn refetch_hint(dataset: Option<DatasetName>) -> String {
    match dataset {
        Some(name) => format!("run `cargo xtask download {name}` to fetch it again"),
        None => "copy it again from its source, or run `cargo xtask download mnist` (or fashion-mnist) if it is one of those".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_one_line_that_names_the_path() {
        let path = PathBuf::from("/data/x/train-images-idx3-ubyte.gz");
        let errors = vec![
            DataError::NotFound {
                path: path.clone(),
                dataset: Some(DatasetName::Mnist),
            },
            DataError::NoData {
                dir: path.clone(),
                dir_exists: false,
                dataset: None,
            },
            DataError::Io {
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
            },
            DataError::TruncatedGzip {
                path: path.clone(),
                dataset: None,
            },
            DataError::LengthMismatch {
                path: path.clone(),
                expected: 10,
                found: 5,
                dataset: Some(DatasetName::FashionMnist),
            },
            DataError::Download {
                path: path.clone(),
                dataset: DatasetName::Mnist,
                attempts: vec!["http://a/: 404".into(), "http://b/: refused".into()],
            },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.starts_with("/data/x/"), "{msg}");
        }
    }

    #[test]
    fn the_missing_file_hint_names_the_download_command() {
        let e = DataError::NotFound {
            path: "d/train-images-idx3-ubyte".into(),
            dataset: None,
        }
        .for_dataset(DatasetName::Mnist);
        assert_eq!(
            e.to_string(),
            "d/train-images-idx3-ubyte: not found; pass --data-dir DIR pointing at a folder with the four MNIST IDX files, or run `cargo xtask download mnist`"
        );
    }
}
