//! Fetching a named data set from its mirrors.
//!
//! Each missing file is fetched from the mirrors in turn until one yields
//! bytes whose uncompressed SHA-256 is the published one. The bytes go to a
//! hidden temporary file in the target directory, are checked there, and
//! only then renamed into place, so the directory never holds a partial or
//! unchecked file under a real name.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::idx::read_idx;
use crate::known;
use crate::name::{all_files, file_stem, find_file, DatasetName};
use crate::DataError;

/// How a download is going, reported to the caller's callback: which
/// file, how far along, and what just happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file being fetched, e.g. `train-images-idx3-ubyte.gz`.
    pub file: String,
    /// The URL being tried; `None` for [`DownloadEvent::Skipped`].
    pub url: Option<String>,
    /// Bytes of `file` received so far from this URL.
    pub downloaded: u64,
    /// The length the server announced, if it did.
    pub total: Option<u64>,
    /// What just happened.
    pub event: DownloadEvent,
}

/// What a [`DownloadProgress`] report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    /// The file is already in the directory and is not fetched again.
    Skipped,
    /// Connected; the transfer begins.
    Started,
    /// More bytes arrived (reported every 256 KiB and at the end).
    Bytes,
    /// This mirror did not work out for the file; the next one is tried.
    MirrorFailed {
        /// Why this mirror failed (HTTP error, checksum mismatch, …).
        reason: String,
    },
    /// The file passed its checksum and is in place.
    Done,
}

/// Where each data set is published, as base URLs to which the file names
/// (`train-images-idx3-ubyte.gz`, …) are appended; tried in this order.
pub fn canonical_mirrors(name: DatasetName) -> Vec<String> {
    let urls: &[&str] = match name {
        // torchvision's mirror first, then TensorFlow's, then the original
        // page (which has been refusing automated downloads at times).
        DatasetName::Mnist => &[
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        // Zalando's own bucket (torchvision's choice), Keras' copy, and the
        // files in the project's GitHub repository.
        DatasetName::FashionMnist => &[
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ],
    };
    urls.iter().map(|u| u.to_string()).collect()
}

/// Fetches whichever of `name`'s four files are missing from `dir`
/// (creating it), trying `mirrors` in order for each, and reports progress
/// through `progress`.
///
/// Files already present are left alone, so an interrupted download can be
/// rerun; [`crate::load_named`] checks them when they are read. A file that
/// no mirror delivers intact is a [`DataError::Download`] listing what each
/// mirror did.
pub fn download(
    name: DatasetName,
    dir: &Path,
    mirrors: &[String],
    progress: &mut dyn FnMut(DownloadProgress),
) -> Result<(), DataError> {
    fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("diffusion-data/", env!("CARGO_PKG_VERSION")))
        .build();

    for (split, kind) in all_files() {
        let file = format!("{}.gz", file_stem(split, kind));
        if find_file(dir, split, kind).is_some() {
            progress(DownloadProgress {
                file,
                url: None,
                downloaded: 0,
                total: None,
                event: DownloadEvent::Skipped,
            });
            continue;
        }
        let want = known::expected(name, split, kind);
        let mut attempts = Vec::new();
        let mut done = false;
        for base in mirrors {
            let url = format!("{}/{file}", base.trim_end_matches('/'));
            match fetch_one(&agent, &url, dir, &file, want, progress) {
                Ok(bytes) => {
                    progress(DownloadProgress {
                        file: file.clone(),
                        url: Some(url),
                        downloaded: bytes,
                        total: Some(bytes),
                        event: DownloadEvent::Done,
                    });
                    done = true;
                    break;
                }
                Err(reason) => {
                    attempts.push(format!("{url}: {reason}"));
                    progress(DownloadProgress {
                        file: file.clone(),
                        url: Some(url),
                        downloaded: 0,
                        total: None,
                        event: DownloadEvent::MirrorFailed { reason },
                    });
                }
            }
        }
        if !done {
            return Err(DataError::Download {
                path: dir.join(&file),
                dataset: name,
                attempts,
            });
        }
    }
    Ok(())
}

/// Fetches `url` into `dir/file` by way of a temporary file; returns the
/// bytes received, or why this mirror failed (one line).
fn fetch_one(
    agent: &ureq::Agent,
    url: &str,
    dir: &Path,
    file: &str,
    want: &known::KnownFile,
    progress: &mut dyn FnMut(DownloadProgress),
) -> Result<u64, String> {
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
        ureq::Error::Transport(t) => {
            // Its Display repeats the URL, which the caller already notes.
            let mut reason = t.kind().to_string();
            if let Some(m) = t.message() {
                reason += &format!(": {m}");
            }
            if let Some(source) = std::error::Error::source(&t) {
                reason += &format!(": {source}");
            }
            one_line(&reason)
        }
    })?;
    let total = response
        .header("Content-Length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let report = |downloaded, event| DownloadProgress {
        file: file.to_string(),
        url: Some(url.to_string()),
        downloaded,
        total,
        event,
    };
    progress(report(0, DownloadEvent::Started));

    let mut temp = TempFile {
        path: dir.join(format!(".{file}.{}.part", std::process::id())),
        keep: false,
    };
    let received = copy_with_progress(response.into_reader(), &temp.path, |received| {
        progress(report(received, DownloadEvent::Bytes))
    })
    .map_err(|e| one_line(&format!("transfer failed: {e}")))?;
    if let Some(total) = total {
        if received != total {
            return Err(format!("connection closed after {received} of {total} bytes"));
        }
    }

    let idx =
        read_idx(&temp.path, want.kind).map_err(|e| one_line(&format!("not a valid IDX file ({e})")))?;
    if idx.sha256 != want.sha256 {
        return Err(format!(
            "checksum mismatch: SHA-256 of the uncompressed data is {}, expected {}",
            idx.sha256, want.sha256
        ));
    }
    // Served uncompressed after all: store it without the .gz suffix.
    let target = if is_gzip(&temp.path) {
        dir.join(file)
    } else {
        dir.join(file.trim_end_matches(".gz"))
    };
    fs::rename(&temp.path, &target).map_err(|e| format!("cannot move into place: {e}"))?;
    temp.keep = true;
    Ok(received)
}

/// Streams `reader` into a new file at `path`, calling `on_bytes` with the
/// running total every 256 KiB and at the end; syncs the file.
fn copy_with_progress(mut reader: impl Read, path: &Path, mut on_bytes: impl FnMut(u64)) -> io::Result<u64> {
    const REPORT_EVERY: u64 = 256 * 1024;
    let mut out = File::create(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut received, mut reported) = (0u64, 0u64);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        received += n as u64;
        if received - reported >= REPORT_EVERY {
            on_bytes(received);
            reported = received;
        }
    }
    if received != reported || received == 0 {
        on_bytes(received);
    }
    out.sync_all()?;
    Ok(received)
}

fn is_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A temporary file, removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_set_has_several_mirrors() {
        for name in DatasetName::ALL {
            let mirrors = canonical_mirrors(name);
            assert!(mirrors.len() >= 2);
            assert!(mirrors.iter().all(|m| m.starts_with("http") && m.ends_with('/')));
        }
    }

    #[test]
    fn progress_is_reported_in_steps_and_at_the_end() {
        let dir = crate::test_util::TempDir::new("dl-copy");
        let data = vec![1u8; 600 * 1024];
        let mut seen = Vec::new();
        let n = copy_with_progress(&data[..], &dir.path().join("x"), |r| seen.push(r)).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(seen.last(), Some(&n));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen.len() >= 2, "{seen:?}");
    }
}
