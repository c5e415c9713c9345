//! Reading one IDX file, gzipped or raw, with its header checked and its
//! SHA-256 taken.
//!
//! The IDX format (LeCun's MNIST page): a big-endian u32 magic number
//! `0x00 0x00 type ndims`, then `ndims` big-endian u32 sizes, then the data,
//! row-major. Only type `0x08` (unsigned byte) is used by MNIST-like sets:
//! images have 3 dimensions [n, rows, cols] (magic 0x00000803), labels one
//! `[n]` (magic 0x00000801).
//!
//! Whether a file is gzipped is decided by its first two bytes (1f 8b), not
//! by its name, so a `.gz` that was already unpacked in place still reads.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};

use crate::known::hex;
use crate::name::FileKind;
use crate::DataError;

/// The IDX type byte for unsigned 8-bit data.
const TYPE_U8: u8 = 0x08;

/// Initial buffer reservations are capped here, so a header that claims an
/// absurd size fails on the length check instead of exhausting memory.
const MAX_RESERVE: u64 = 1 << 30;

/// One decoded IDX file.
#[derive(Debug, Clone)]
pub struct IdxFile {
    /// The file it was read from.
    pub path: PathBuf,
    /// The sizes from the header, e.g. [60000, 28, 28].
    pub dims: Vec<usize>,
    /// The data after the header, row-major.
    pub data: Vec<u8>,
    /// Lower-case hex SHA-256 of the whole uncompressed file (header and data).
    pub sha256: String,
}

/// The magic number an IDX file of unsigned bytes with `kind`'s number of
/// dimensions starts with.
pub fn expected_magic(kind: FileKind) -> u32 {
    (u32::from(TYPE_U8) << 8) | kind.ndims() as u32
}

/// Reads `path` (gzip or raw), checks that it is an unsigned-byte IDX file
/// with the dimensions of `kind` and exactly as much data as its header
/// declares, and hashes the uncompressed bytes.
pub fn read_idx(path: &Path, kind: FileKind) -> Result<IdxFile, DataError> {
    let (mut source, gzipped, size_hint) = open_stream(path)?;
    let stream_err = |source: io::Error| stream_error(path, gzipped, source);
    let (header, dims) = read_header(&mut source, path, kind, gzipped)?;
    // Saturating: a header whose sizes overflow u64 simply never matches.
    let expected = dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d as u64));

    // Data: read at most one byte more than declared, so that a file with
    // trailing bytes is caught without reading an unbounded amount first.
    // Reading up to the end also makes the gzip decoder check its CRC.
    let reserve = expected
        .min(size_hint.saturating_sub(header.len() as u64))
        .min(MAX_RESERVE);
    let mut data = Vec::with_capacity(reserve as usize + 1);
    (&mut source)
        .take(expected.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(stream_err)?;
    let mut found = data.len() as u64;
    if found != expected {
        if found > expected {
            found += io::copy(&mut source, &mut io::sink()).map_err(stream_err)?;
        }
        return Err(DataError::LengthMismatch {
            path: path.to_path_buf(),
            expected,
            found,
            dataset: None,
        });
    }

    let mut hasher = Sha256::new();
    hasher.update(&header);
    hasher.update(&data);
    Ok(IdxFile {
        path: path.to_path_buf(),
        dims,
        data,
        sha256: hex(&hasher.finalize()),
    })
}

/// Opens `path` as a stream of its uncompressed bytes: whether it is
/// gzipped, and about how many bytes it holds uncompressed.
fn open_stream(path: &Path) -> Result<(Box<dyn Read>, bool, u64), DataError> {
    let io_err = |source: io::Error| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DataError::NotFound {
            path: path.to_path_buf(),
            dataset: None,
        },
        _ => io_err(source),
    })?;
    let file_len = file.metadata().map_err(io_err)?.len();

    let mut sniff = [0u8; 2];
    let sniffed = read_up_to(&mut file, &mut sniff).map_err(io_err)?;
    let gzipped = sniffed == 2 && sniff == [0x1f, 0x8b];
    // A gzip file ends with the uncompressed size mod 2^32 (RFC 1952
    // ISIZE); used only to reserve the output buffer in one go.
    let size_hint = if gzipped && file_len >= 18 {
        file.seek(SeekFrom::End(-4)).map_err(io_err)?;
        let mut isize = [0u8; 4];
        file.read_exact(&mut isize).map_err(io_err)?;
        u64::from(u32::from_le_bytes(isize))
    } else {
        file_len
    };
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;

    let source: Box<dyn Read> = if gzipped {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(io::BufReader::with_capacity(1 << 16, file))
    };
    Ok((source, gzipped, size_hint))
}

/// Reads and checks the header: the magic number, then one u32 per
/// dimension. Returns its bytes and the dimensions.
fn read_header(
    source: &mut impl Read,
    path: &Path,
    kind: FileKind,
    gzipped: bool,
) -> Result<(Vec<u8>, Vec<usize>), DataError> {
    let stream_err = |e: io::Error| stream_error(path, gzipped, e);
    let mut magic = [0u8; 4];
    let got = read_up_to(source, &mut magic).map_err(stream_err)?;
    if got < 4 {
        return Err(DataError::LengthMismatch {
            path: path.to_path_buf(),
            expected: 4,
            found: got as u64,
            dataset: None,
        });
    }
    let found_magic = u32::from_be_bytes(magic);
    if magic[0] != 0 || magic[1] != 0 || magic[2] != TYPE_U8 {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            kind,
            found: found_magic,
            expected: expected_magic(kind),
        });
    }
    let ndims = usize::from(magic[3]);
    if ndims != kind.ndims() {
        return Err(DataError::WrongDimensions {
            path: path.to_path_buf(),
            kind,
            found: ndims,
            expected: kind.ndims(),
        });
    }
    let mut header = magic.to_vec();
    header.resize(4 + 4 * ndims, 0);
    let got = read_up_to(source, &mut header[4..]).map_err(stream_err)?;
    if got < 4 * ndims {
        return Err(DataError::LengthMismatch {
            path: path.to_path_buf(),
            expected: header.len() as u64,
            found: 4 + got as u64,
            dataset: None,
        });
    }
    let dims: Vec<usize> = header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok((header, dims))
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Sorts an error from the (possibly gzip-decoding) stream into the typed
/// errors: an early end of a gzip stream is a truncated file, bad deflate
/// data or a bad CRC is corruption, the rest is I/O.
fn stream_error(path: &Path, gzipped: bool, source: io::Error) -> DataError {
    let path = path.to_path_buf();
    match source.kind() {
        io::ErrorKind::UnexpectedEof if gzipped => DataError::TruncatedGzip { path, dataset: None },
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::Other if gzipped => {
            DataError::CorruptGzip {
                path,
                reason: source.to_string(),
                dataset: None,
            }
        }
        _ => DataError::Io { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{gzip, idx_bytes, TempDir};

    #[test]
    fn reads_raw_and_gzipped_files_alike() {
        let dir = TempDir::new("idx-read");
        let bytes = idx_bytes(&[2, 3, 2], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let raw = dir.write("raw", &bytes);
        let gz = dir.write("gz.gz", &gzip(&bytes));
        let a = read_idx(&raw, FileKind::Images).unwrap();
        let b = read_idx(&gz, FileKind::Images).unwrap();
        assert_eq!(a.dims, vec![2, 3, 2]);
        assert_eq!(a.data, (0..12).collect::<Vec<u8>>());
        assert_eq!(a.data, b.data);
        // The checksum is over the uncompressed bytes, so both agree.
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.sha256, hex(&Sha256::digest(&bytes)));
    }

    #[test]
    fn magic_numbers_follow_the_format() {
        assert_eq!(expected_magic(FileKind::Images), 2051);
        assert_eq!(expected_magic(FileKind::Labels), 2049);
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = TempDir::new("idx-missing");
        let err = read_idx(&dir.path().join("nope"), FileKind::Labels).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
    }

    #[test]
    fn truncated_gzip_is_reported_as_such() {
        let dir = TempDir::new("idx-truncated");
        let bytes = idx_bytes(&[100], &[7; 100]);
        let gz = gzip(&bytes);
        for cut in [gz.len() / 2, gz.len() - 3] {
            let path = dir.write("labels.gz", &gz[..cut]);
            let err = read_idx(&path, FileKind::Labels).unwrap_err();
            assert!(
                matches!(err, DataError::TruncatedGzip { .. }),
                "cut at {cut}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            assert!(msg.contains("ends early"), "{msg}");
        }
    }

    #[test]
    fn corrupt_gzip_crc_is_caught() {
        let dir = TempDir::new("idx-crc");
        let mut gz = gzip(&idx_bytes(&[100], &[7; 100]));
        let n = gz.len();
        gz[n - 8] ^= 0xff; // the CRC32 in the trailer
        let path = dir.write("labels.gz", &gz);
        let err = read_idx(&path, FileKind::Labels).unwrap_err();
        assert!(matches!(err, DataError::CorruptGzip { .. }), "{err:?}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let dir = TempDir::new("idx-magic");
        // A PNG signature where the IDX header should be.
        let path = dir.write("images", b"\x89PNG\r\n\x1a\n0000000000000000");
        let err = read_idx(&path, FileKind::Images).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    found: 0x8950_4e47,
                    expected: 0x0803,
                    ..
                }
            ),
            "{err:?}"
        );
        // IDX, but of 32-bit ints (type 0x0c) rather than bytes.
        let path = dir.write("ints", &[0, 0, 0x0c, 1, 0, 0, 0, 0]);
        let err = read_idx(&path, FileKind::Labels).unwrap_err();
        assert!(matches!(err, DataError::BadMagic { .. }), "{err:?}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn wrong_number_of_dimensions_is_rejected() {
        let dir = TempDir::new("idx-dims");
        // A labels file (1 dimension) where images (3) are expected.
        let path = dir.write("x.gz", &gzip(&idx_bytes(&[4], &[1, 2, 3, 4])));
        let err = read_idx(&path, FileKind::Images).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::WrongDimensions {
                    found: 1,
                    expected: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("swapped"), "{err}");
    }

    #[test]
    fn short_and_long_data_are_length_mismatches() {
        let dir = TempDir::new("idx-length");
        let mut bytes = idx_bytes(&[10], &[1; 10]);
        bytes.pop();
        let path = dir.write("short", &bytes);
        let err = read_idx(&path, FileKind::Labels).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LengthMismatch {
                    expected: 10,
                    found: 9,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");

        bytes.extend_from_slice(&[1, 1, 1]);
        let path = dir.write("long.gz", &gzip(&bytes));
        let err = read_idx(&path, FileKind::Labels).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LengthMismatch {
                    expected: 10,
                    found: 12,
                    ..
                }
            ),
            "{err:?}"
        );

        // Ends inside the header: 16 bytes needed, 6 there.
        let path = dir.write("header", &[0, 0, 8, 3, 0, 0]);
        let err = read_idx(&path, FileKind::Images).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LengthMismatch {
                    expected: 16,
                    found: 6,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_header_claiming_huge_sizes_fails_without_allocating_them() {
        let dir = TempDir::new("idx-huge");
        let mut bytes = vec![0, 0, 8, 3];
        for d in [u32::MAX, u32::MAX, 28] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(&[0; 100]);
        let path = dir.write("huge", &bytes);
        let err = read_idx(&path, FileKind::Images).unwrap_err();
        assert!(
            matches!(err, DataError::LengthMismatch { found: 100, .. }),
            "{err:?}"
        );
    }
}
