//! The data sets this crate knows by name, their splits, and the file names
//! of the IDX layout they share.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// A data set known by name: its checksums are built in and it has mirrors
/// to download from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// LeCun, Cortes and Burges' handwritten digits; bundled in `data/mnist`.
    Mnist,
    /// Zalando's clothing images (Xiao et al. 2017), same format as MNIST;
    /// not bundled.
    FashionMnist,
}

impl DatasetName {
    /// Every known data set, in a fixed order.
    pub const ALL: [DatasetName; 2] = [DatasetName::Mnist, DatasetName::FashionMnist];

    /// The name used on the command line, in paths and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Mnist => "mnist",
            DatasetName::FashionMnist => "fashion-mnist",
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = DataError;

    /// Accepts `mnist` and `fashion-mnist` (also `fashion_mnist` and
    /// `fashionmnist`), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mnist" => Ok(DatasetName::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetName::FashionMnist),
            _ => Err(DataError::UnknownDataset { name: s.to_string() }),
        }
    }
}

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// 60,000 images for MNIST and Fashion-MNIST; files `train-*`.
    Train,
    /// 10,000 images; files `t10k-*`.
    Test,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// The prefix of the split's files: `train` or `t10k`.
    pub fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Images or labels: the two files of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// `*-images-idx3-ubyte`: unsigned bytes, 3 dimensions [n, rows, cols].
    Images,
    /// `*-labels-idx1-ubyte`: unsigned bytes, 1 dimension `[n]`.
    Labels,
}

impl FileKind {
    /// The number of dimensions the IDX header must declare.
    pub fn ndims(self) -> usize {
        match self {
            FileKind::Images => 3,
            FileKind::Labels => 1,
        }
    }

    fn infix(self) -> &'static str {
        match self {
            FileKind::Images => "images-idx3",
            FileKind::Labels => "labels-idx1",
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Images => "images",
            FileKind::Labels => "labels",
        })
    }
}

/// The uncompressed file name of one IDX file, e.g. `t10k-labels-idx1-ubyte`.
pub fn file_stem(split: Split, kind: FileKind) -> String {
    format!("{}-{}-ubyte", split.file_prefix(), kind.infix())
}

/// The four files of a data set directory, train first, images before labels.
pub fn all_files() -> [(Split, FileKind); 4] {
    [
        (Split::Train, FileKind::Images),
        (Split::Train, FileKind::Labels),
        (Split::Test, FileKind::Images),
        (Split::Test, FileKind::Labels),
    ]
}

/// The file to read for `split`/`kind` in `dir`: the raw file if it exists
/// (it needs no decompression), else the `.gz`, else `None`.
pub fn find_file(dir: &Path, split: Split, kind: FileKind) -> Option<PathBuf> {
    let stem = file_stem(split, kind);
    let raw = dir.join(&stem);
    if raw.is_file() {
        return Some(raw);
    }
    let gz = dir.join(format!("{stem}.gz"));
    gz.is_file().then_some(gz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_display_and_from_str() {
        for name in DatasetName::ALL {
            assert_eq!(name.to_string().parse::<DatasetName>().unwrap(), name);
        }
        assert_eq!(
            "Fashion_MNIST".parse::<DatasetName>().unwrap(),
            DatasetName::FashionMnist
        );
        let err = "cifar10".parse::<DatasetName>().unwrap_err();
        assert!(err.to_string().contains("mnist, fashion-mnist"), "{err}");
    }

    #[test]
    fn names_serialize_as_their_display_form() {
        for name in DatasetName::ALL {
            let json = serde_json::to_string(&name).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<DatasetName>(&json).unwrap(), name);
        }
        assert_eq!(serde_json::to_string(&Split::Test).unwrap(), "\"test\"");
    }

    #[test]
    fn file_names_follow_the_idx_layout() {
        assert_eq!(
            file_stem(Split::Train, FileKind::Images),
            "train-images-idx3-ubyte"
        );
        assert_eq!(file_stem(Split::Test, FileKind::Labels), "t10k-labels-idx1-ubyte");
    }
}
