//! One split of an image data set in memory, and loading it from a
//! directory of IDX files.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::idx::{read_idx, IdxFile};
use crate::known::{self, KnownFile};
use crate::name::{all_files, file_stem, find_file, DatasetName, FileKind, Split};
use crate::DataError;

/// One split of a data set: `len` grey-scale images of `height`×`width`
/// bytes and their labels.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// `len * height * width` bytes, image after image, each row-major;
    /// 0 is the background for MNIST.
    pub images: Vec<u8>,
    /// One class label per image.
    pub labels: Vec<u8>,
    /// Number of images (and labels).
    pub len: usize,
    /// Image height in pixels (rows).
    pub height: usize,
    /// Image width in pixels (columns).
    pub width: usize,
    /// The largest label plus one (10 for MNIST and Fashion-MNIST; 0 for an
    /// empty set).
    pub num_classes: usize,
    /// The known data set whose published checksums both files match;
    /// `None` for any other IDX data (then `warnings` says why).
    pub known: Option<DatasetName>,
    /// One line each, for the caller to print: e.g. that a file's checksum
    /// matches no known data set.
    pub warnings: Vec<String>,
}

impl ImageSet {
    /// A set from bytes already in memory (tests, synthetic data).
    ///
    /// # Panics
    /// If `images.len() != labels.len() * height * width`.
    pub fn new(images: Vec<u8>, labels: Vec<u8>, height: usize, width: usize) -> Self {
        assert_eq!(
            images.len(),
            labels.len() * height * width,
            "ImageSet::new: {} image bytes for {} labels of {height}x{width}",
            images.len(),
            labels.len()
        );
        ImageSet {
            num_classes: num_classes(&labels),
            len: labels.len(),
            images,
            labels,
            height,
            width,
            known: None,
            warnings: Vec::new(),
        }
    }

    /// The bytes of image `i` (`height * width`, row-major).
    ///
    /// # Panics
    /// If `i >= len`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width;
        &self.images[i * n..(i + 1) * n]
    }

    /// The label of image `i`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// Pixels per image.
    pub fn image_size(&self) -> usize {
        self.height * self.width
    }

    /// How many images carry each label, indexed by label.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// The first `n` images (all of them if there are fewer), e.g. for a
    /// quick run. `known` and `warnings` are kept: the data still comes from
    /// that set.
    pub fn truncated(mut self, n: usize) -> Self {
        let n = n.min(self.len);
        self.images.truncate(n * self.image_size());
        self.labels.truncate(n);
        self.len = n;
        self
    }
}

/// Sizes and provenance, not the megabytes of pixels.
impl fmt::Debug for ImageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageSet")
            .field("len", &self.len)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("num_classes", &self.num_classes)
            .field("known", &self.known)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

fn num_classes(labels: &[u8]) -> usize {
    labels.iter().max().map_or(0, |&m| usize::from(m) + 1)
}

/// Whether all four IDX files (`train`/`t10k`, images/labels, raw or
/// `.gz`) are in `dir`.
pub fn is_present(dir: &Path) -> bool {
    all_files()
        .into_iter()
        .all(|(split, kind)| find_file(dir, split, kind).is_some())
}

/// Reads `{dir}/{train|t10k}-{images-idx3|labels-idx1}-ubyte`, with or
/// without `.gz` (the raw file wins when both exist), from any directory of
/// MNIST-format IDX files.
///
/// Both files are checked (magic numbers, dimensions, lengths, equal
/// counts) and hashed. If the checksums are those of a known data set's
/// split, `known` says which; otherwise the set is still returned, with a
/// line in `warnings`. To insist on a particular data set, use
/// [`load_named`].
pub fn load_split(dir: &Path, split: Split) -> Result<ImageSet, DataError> {
    let (images, labels) = read_pair(dir, split)?;
    let mut warnings = Vec::new();
    let known = identify(&images, &labels, split, &mut warnings)?;
    let mut set = assemble(images, labels);
    set.known = known;
    set.warnings = warnings;
    Ok(set)
}

/// Reads the `split` of data set `name` from `dir` and requires both files
/// to have its published SHA-256 ([`crate::known::KNOWN_FILES`]); a file
/// that differs is a [`DataError::ChecksumMismatch`]. Messages about missing
/// or damaged files name `name`'s download command.
pub fn load_named(name: DatasetName, dir: &Path, split: Split) -> Result<ImageSet, DataError> {
    let (images, labels) = read_pair(dir, split).map_err(|e| e.for_dataset(name))?;
    for (file, kind) in [(&images, FileKind::Images), (&labels, FileKind::Labels)] {
        let want = known::expected(name, split, kind);
        if file.sha256 != want.sha256 {
            return Err(DataError::ChecksumMismatch {
                path: file.path.clone(),
                dataset: name,
                expected: want.sha256.to_string(),
                found: file.sha256.clone(),
            });
        }
    }
    let mut set = assemble(images, labels);
    set.known = Some(name);
    Ok(set)
}

/// Finds and reads the images and labels files of `split`.
fn read_pair(dir: &Path, split: Split) -> Result<(IdxFile, IdxFile), DataError> {
    let locate = |kind| {
        find_file(dir, split, kind).ok_or_else(|| {
            if all_files()
                .into_iter()
                .any(|(s, k)| find_file(dir, s, k).is_some())
            {
                DataError::NotFound {
                    path: dir.join(file_stem(split, kind) + "[.gz]"),
                    dataset: None,
                }
            } else {
                DataError::NoData {
                    dir: dir.to_path_buf(),
                    dir_exists: dir.is_dir(),
                    dataset: None,
                }
            }
        })
    };
    let images_path = locate(FileKind::Images)?;
    let labels_path = locate(FileKind::Labels)?;
    let images = read_idx(&images_path, FileKind::Images)?;
    let labels = read_idx(&labels_path, FileKind::Labels)?;
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::CountMismatch {
            images: images_path,
            labels: labels_path,
            images_len: images.dims[0],
            labels_len: labels.dims[0],
        });
    }
    Ok((images, labels))
}

/// Which known data set the pair is, if any; notes anything odd in
/// `warnings`. Images of one known set with labels of another is an error:
/// training on it would silently learn nonsense.
fn identify(
    images: &IdxFile,
    labels: &IdxFile,
    split: Split,
    warnings: &mut Vec<String>,
) -> Result<Option<DatasetName>, DataError> {
    let ki = known::by_sha256(&images.sha256);
    let kl = known::by_sha256(&labels.sha256);
    if let (Some(a), Some(b)) = (ki, kl) {
        if a.dataset != b.dataset {
            return Err(DataError::MixedDatasets {
                images: images.path.clone(),
                labels: labels.path.clone(),
                images_from: a.dataset,
                labels_from: b.dataset,
            });
        }
    }
    let mut all_match = true;
    for (file, k) in [(images, ki), (labels, kl)] {
        match k {
            None => {
                all_match = false;
                warnings.push(format!(
                    "{}: SHA-256 {} matches no known data set (not MNIST or Fashion-MNIST); reading it as unknown IDX data",
                    file.path.display(),
                    file.sha256
                ));
            }
            Some(KnownFile {
                dataset, split: s, ..
            }) if *s != split => {
                all_match = false;
                warnings.push(format!(
                    "{}: this is the {dataset} {s} split's file, found under the {split} split's name",
                    file.path.display()
                ));
            }
            Some(_) => {}
        }
    }
    Ok(match (ki, all_match) {
        (Some(k), true) => Some(k.dataset),
        _ => None,
    })
}

/// An [`ImageSet`] from a checked images/labels pair.
fn assemble(images: IdxFile, labels: IdxFile) -> ImageSet {
    let (len, height, width) = (images.dims[0], images.dims[1], images.dims[2]);
    let path: PathBuf = images.path;
    debug_assert_eq!(images.data.len(), len * height * width, "{}", path.display());
    ImageSet {
        num_classes: num_classes(&labels.data),
        images: images.data,
        labels: labels.data,
        len,
        height,
        width,
        known: None,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{bundled_mnist_dir, gzip, idx_bytes, real_fashion_mnist, write_tiny_set, TempDir};

    #[test]
    fn bundled_mnist_loads_and_is_recognised() {
        let dir = bundled_mnist_dir();
        let test = load_split(&dir, Split::Test).unwrap();
        assert_eq!((test.len, test.height, test.width), (10_000, 28, 28));
        assert_eq!(test.known, Some(DatasetName::Mnist));
        assert!(test.warnings.is_empty(), "{:?}", test.warnings);
        assert_eq!(test.num_classes, 10);
        // Label counts from data/mnist's SOURCE notes (torchvision agrees).
        assert_eq!(
            test.label_counts(),
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        );

        let train = load_named(DatasetName::Mnist, &dir, Split::Train).unwrap();
        assert_eq!(train.len, 60_000);
        assert_eq!(
            train.label_counts(),
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        );
        // Pixel mean over the training set, scaled to [0, 1]: 0.1307, the
        // normalisation constant every MNIST tutorial uses.
        let mean =
            train.images.iter().map(|&p| f64::from(p)).sum::<f64>() / train.images.len() as f64 / 255.0;
        assert!((mean - 0.1307).abs() < 5e-5, "{mean}");
        // The first training image is a 5.
        assert_eq!(train.label(0), 5);
        assert_eq!(train.image(0).len(), 784);
    }

    #[test]
    fn real_fashion_mnist_is_recognised() {
        let Some(dir) = real_fashion_mnist("the Fashion-MNIST check") else {
            return;
        };
        let test = load_named(DatasetName::FashionMnist, &dir, Split::Test).unwrap();
        assert_eq!(test.len, 10_000);
        assert_eq!(test.label_counts(), vec![1000; 10]);
        let any = load_split(&dir, Split::Test).unwrap();
        assert_eq!(any.known, Some(DatasetName::FashionMnist));
        // Asking for MNIST in the Fashion-MNIST folder is a checksum error.
        let err = load_named(DatasetName::Mnist, &dir, Split::Test).unwrap_err();
        assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err:?}");
    }

    #[test]
    fn an_unknown_directory_of_idx_files_loads_with_a_warning() {
        let dir = TempDir::new("set-unknown");
        write_tiny_set(dir.path(), 30, 12, 4, 5);
        let set = load_split(dir.path(), Split::Train).unwrap();
        assert_eq!((set.len, set.height, set.width, set.num_classes), (30, 4, 5, 10));
        assert_eq!(set.known, None);
        assert_eq!(set.warnings.len(), 2, "{:?}", set.warnings);
        assert!(set.warnings[0].contains("matches no known data set"));
        assert_eq!(set.image(7), &[7; 20]);
        assert_eq!(set.label(13), 3);
        let test = load_split(dir.path(), Split::Test).unwrap();
        assert_eq!(test.len, 12);
        assert!(is_present(dir.path()));
    }

    #[test]
    fn raw_files_are_preferred_to_gz_and_both_read() {
        let dir = TempDir::new("set-raw");
        write_tiny_set(dir.path(), 3, 3, 2, 2);
        // A raw labels file beside the .gz, with different labels.
        dir.write("train-labels-idx1-ubyte", &idx_bytes(&[3], &[9, 9, 9]));
        let set = load_split(dir.path(), Split::Train).unwrap();
        assert_eq!(set.labels, [9, 9, 9]);
    }

    #[test]
    fn named_load_rejects_a_checksum_mismatch() {
        let dir = TempDir::new("set-checksum");
        write_tiny_set(dir.path(), 5, 5, 28, 28);
        let err = load_named(DatasetName::Mnist, dir.path(), Split::Train).unwrap_err();
        let DataError::ChecksumMismatch { path, expected, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(path.ends_with("train-images-idx3-ubyte.gz"));
        assert_eq!(
            expected,
            known::expected(DatasetName::Mnist, Split::Train, FileKind::Images).sha256
        );
        let msg = err.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("cargo xtask download mnist"), "{msg}");
    }

    #[test]
    fn missing_file_names_the_file_and_the_fix() {
        let dir = TempDir::new("set-missing");
        write_tiny_set(dir.path(), 3, 3, 2, 2);
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        assert!(!is_present(dir.path()));
        load_split(dir.path(), Split::Train).unwrap();
        let err = load_named(DatasetName::Mnist, dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("t10k-labels-idx1-ubyte[.gz]: not found"), "{msg}");
        assert!(
            msg.contains("--data-dir") && msg.contains("cargo xtask download mnist"),
            "{msg}"
        );
    }

    #[test]
    fn a_directory_without_data_is_no_data() {
        let dir = TempDir::new("set-empty");
        dir.write("README", b"nothing here");
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(
            matches!(err, DataError::NoData { dir_exists: true, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("no IDX files here"), "{err}");

        let gone = dir.path().join("does-not-exist");
        let err = load_named(DatasetName::FashionMnist, &gone, Split::Test).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::NoData {
                    dir_exists: false,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("cargo xtask download fashion-mnist"),
            "{err}"
        );
    }

    #[test]
    fn image_and_label_counts_must_agree() {
        let dir = TempDir::new("set-counts");
        write_tiny_set(dir.path(), 6, 3, 2, 2);
        dir.write("train-labels-idx1-ubyte.gz", &gzip(&idx_bytes(&[5], &[0; 5])));
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    images_len: 6,
                    labels_len: 5,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn errors_from_files_in_a_set_are_typed() {
        let dir = TempDir::new("set-errors");
        write_tiny_set(dir.path(), 6, 3, 2, 2);
        // Truncated gzip.
        let gz = std::fs::read(dir.path().join("train-images-idx3-ubyte.gz")).unwrap();
        dir.write("train-images-idx3-ubyte.gz", &gz[..gz.len() - 10]);
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(matches!(err, DataError::TruncatedGzip { .. }), "{err:?}");
        // Labels in place of images: wrong number of dimensions.
        let labels = std::fs::read(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        dir.write("t10k-images-idx3-ubyte.gz", &labels);
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::WrongDimensions { .. }), "{err:?}");
    }

    #[test]
    fn images_of_one_known_set_with_labels_of_another_are_refused() {
        let Some(fashion) = real_fashion_mnist("the mixed-set check") else {
            return;
        };
        let dir = TempDir::new("set-mixed");
        for (from, file) in [
            (bundled_mnist_dir(), "t10k-images-idx3-ubyte.gz"),
            (fashion, "t10k-labels-idx1-ubyte.gz"),
        ] {
            std::fs::copy(from.join(file), dir.path().join(file)).unwrap();
        }
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::MixedDatasets {
                    images_from: DatasetName::Mnist,
                    labels_from: DatasetName::FashionMnist,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_known_file_under_the_other_splits_name_is_warned_about() {
        let dir = TempDir::new("set-swapped");
        let mnist = bundled_mnist_dir();
        // The MNIST test split, named as the train split.
        std::fs::copy(
            mnist.join("t10k-images-idx3-ubyte.gz"),
            dir.path().join("train-images-idx3-ubyte.gz"),
        )
        .unwrap();
        std::fs::copy(
            mnist.join("t10k-labels-idx1-ubyte.gz"),
            dir.path().join("train-labels-idx1-ubyte.gz"),
        )
        .unwrap();
        let set = load_split(dir.path(), Split::Train).unwrap();
        assert_eq!(set.known, None);
        assert_eq!(set.warnings.len(), 2);
        assert!(
            set.warnings[0].contains("mnist test split's file"),
            "{:?}",
            set.warnings
        );
    }

    #[test]
    fn debug_output_leaves_the_pixels_out() {
        let set = ImageSet::new(vec![0; 7840], vec![1; 10], 28, 28);
        let s = format!("{set:?}");
        assert!(s.len() < 200 && s.contains("len: 10"), "{s}");
    }

    #[test]
    fn truncated_keeps_the_first_images() {
        let set = ImageSet::new((0..12).collect(), vec![0, 1, 2], 2, 2).truncated(2);
        assert_eq!((set.len, set.images.len()), (2, 8));
        assert_eq!(set.image(1), &[4, 5, 6, 7]);
    }
}
