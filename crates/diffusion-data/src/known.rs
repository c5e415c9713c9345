//! The SHA-256 of every known IDX file, uncompressed.
//!
//! Checksums are taken over the bytes gunzip yields, not over the `.gz`:
//! mirrors recompress the same data with different gzip headers (the bundled
//! MNIST train files are an example), and the data is what matters. The
//! table is the one in `data/IDX-SHA256SUMS`; a test keeps the two equal.

use crate::name::{DatasetName, FileKind, Split};

/// One file of a known data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownFile {
    /// The data set the file belongs to.
    pub dataset: DatasetName,
    /// Whether it is the training or the test split.
    pub split: Split,
    /// Whether it holds the images or the labels.
    pub kind: FileKind,
    /// Lower-case hex SHA-256 of the uncompressed IDX file.
    pub sha256: &'static str,
    /// Size of the uncompressed IDX file in bytes.
    pub size: u64,
}

use DatasetName::{FashionMnist, Mnist};
use FileKind::{Images, Labels};
use Split::{Test, Train};

const fn known(
    dataset: DatasetName,
    split: Split,
    kind: FileKind,
    sha256: &'static str,
    size: u64,
) -> KnownFile {
    KnownFile {
        dataset,
        split,
        kind,
        sha256,
        size,
    }
}

/// All known files.
pub const KNOWN_FILES: [KnownFile; 8] = [
    known(
        Mnist,
        Test,
        Images,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7_840_016,
    ),
    known(
        Mnist,
        Test,
        Labels,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_008,
    ),
    known(
        Mnist,
        Train,
        Images,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47_040_016,
    ),
    known(
        Mnist,
        Train,
        Labels,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_008,
    ),
    known(
        FashionMnist,
        Test,
        Images,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7_840_016,
    ),
    known(
        FashionMnist,
        Test,
        Labels,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10_008,
    ),
    known(
        FashionMnist,
        Train,
        Images,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47_040_016,
    ),
    known(
        FashionMnist,
        Train,
        Labels,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60_008,
    ),
];

/// The known file with this checksum, if any.
pub fn by_sha256(sha256: &str) -> Option<&'static KnownFile> {
    KNOWN_FILES.iter().find(|k| k.sha256 == sha256)
}

/// The expected file of `dataset` for `split` and `kind`.
pub fn expected(dataset: DatasetName, split: Split, kind: FileKind) -> &'static KnownFile {
    KNOWN_FILES
        .iter()
        .find(|k| k.dataset == dataset && k.split == split && k.kind == kind)
        .expect("KNOWN_FILES lists every (data set, split, kind)")
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::{all_files, file_stem};

    /// The table above must say what `data/IDX-SHA256SUMS` says.
    #[test]
    fn table_matches_the_sums_file_shipped_with_the_data() {
        let sums = include_str!("../../../data/IDX-SHA256SUMS");
        let mut rows = 0;
        for line in sums
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (sha, size, path) = (cols[0], cols[1].parse::<u64>().unwrap(), cols[2]);
            let k = by_sha256(sha).unwrap_or_else(|| panic!("{path} missing from KNOWN_FILES"));
            assert_eq!(format!("{}/{}", k.dataset, file_stem(k.split, k.kind)), path);
            assert_eq!(k.size, size);
            rows += 1;
        }
        assert_eq!(rows, KNOWN_FILES.len());
    }

    #[test]
    fn every_dataset_has_all_four_files() {
        for name in DatasetName::ALL {
            for (split, kind) in all_files() {
                assert_eq!(expected(name, split, kind).dataset, name);
            }
        }
    }

    #[test]
    fn hex_of_sha256_of_empty_input() {
        use sha2::{Digest, Sha256};
        // `sha256sum < /dev/null`
        assert_eq!(
            hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
