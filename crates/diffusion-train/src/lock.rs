//! One writer per run directory: a lock file that holds the owner's
//! process id, created exclusively, removed when the lock is dropped.
//!
//! A lock left by a process that no longer runs (killed with -9, a power
//! cut) is stale: acquiring it removes it and says so. On systems without
//! `/proc` a leftover lock cannot be told from a live one and must be
//! removed by hand (the error says which file).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// Why a run directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error("{}: process {pid} is using this run directory (another `train`?); wait for it or stop it", .path.display())]
    Busy {
        /// The lock file.
        path: PathBuf,
        /// The holder.
        pid: u32,
    },
    /// The lock file exists and its owner cannot be checked.
    #[error("{}: the run directory is locked ({reason}); if no other process uses it, delete this file", .path.display())]
    Unknown {
        /// The lock file.
        path: PathBuf,
        /// Why the owner could not be checked.
        reason: String,
    },
    /// The lock file could not be written.
    #[error("{}: cannot create the lock file: {error}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error (part of the message).
        error: io::Error,
    },
}

/// A held lock on a run directory; released when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    /// The process id of a stale lock removed when this one was taken.
    pub removed_stale: Option<u32>,
}

impl RunLock {
    /// Locks `run_dir` (created if missing) for this process.
    pub fn acquire(run_dir: &Path) -> Result<RunLock, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let io_err = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        fs::create_dir_all(run_dir).map_err(io_err)?;
        let mut removed_stale = None;
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(io_err)?;
                    f.sync_all().map_err(io_err)?;
                    return Ok(RunLock { path, removed_stale });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let text = read_owner(&path);
                    let Ok(pid) = text.trim().parse::<u32>() else {
                        // Being written by its owner this instant, or garbage.
                        return Err(LockError::Unknown {
                            path: path.clone(),
                            reason: format!("it holds {:?}, not a process id", text.trim()),
                        });
                    };
                    match process_alive(pid) {
                        Some(true) => {
                            return Err(LockError::Busy {
                                path: path.clone(),
                                pid,
                            })
                        }
                        Some(false) => {
                            let _ = fs::remove_file(&path);
                            removed_stale = Some(pid);
                        }
                        None => {
                            return Err(LockError::Unknown {
                                path: path.clone(),
                                reason: format!("by process {pid}, which cannot be checked here"),
                            })
                        }
                    }
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Err(LockError::Unknown {
            path: path.clone(),
            reason: "another process took it at the same moment".to_string(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The lock file's text. An empty file is one its owner has created but
/// not yet written (between `create_new` and the write of its process id):
/// it is read again for up to a second before being taken as it is.
fn read_owner(path: &Path) -> String {
    for _ in 0..50 {
        let text = fs::read_to_string(path).unwrap_or_default();
        if !text.trim().is_empty() || !path.exists() {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fs::read_to_string(path).unwrap_or_default()
}

/// Whether process `pid` exists (`None` where that cannot be told).
fn process_alive(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        return Some(true);
    }
    let proc = Path::new("/proc");
    proc.join("self")
        .exists()
        .then(|| proc.join(pid.to_string()).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_stale_locks_are_taken_over() {
        let dir = std::env::temp_dir().join(format!("diffusion-train-lock-{}", std::process::id()));
        let lock = RunLock::acquire(&dir).unwrap();
        assert!(matches!(RunLock::acquire(&dir), Err(LockError::Busy { .. })));
        drop(lock);
        assert!(!dir.join(LOCK_FILE).exists());
        // A lock left by a process that is gone (pid 2^22 + 7 is above
        // Linux's default pid_max, so it never runs).
        fs::write(dir.join(LOCK_FILE), "4194311\n").unwrap();
        let lock = RunLock::acquire(&dir).unwrap();
        assert_eq!(lock.removed_stale, Some(4_194_311));
        drop(lock);
        fs::write(dir.join(LOCK_FILE), "garbage").unwrap();
        assert!(matches!(RunLock::acquire(&dir), Err(LockError::Unknown { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_being_written_is_waited_for_not_reported_as_garbage() {
        // Another process has created the file and not yet written its id
        // (two `train`s started together): the second must say "busy".
        let dir = std::env::temp_dir().join(format!("diffusion-train-lock-race-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LOCK_FILE), "").unwrap();
        let writer = {
            let path = dir.join(LOCK_FILE);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                fs::write(path, format!("{}\n", std::process::id())).unwrap();
            })
        };
        let got = RunLock::acquire(&dir);
        writer.join().unwrap();
        assert!(
            matches!(got, Err(LockError::Busy { pid, .. }) if pid == std::process::id()),
            "{got:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
