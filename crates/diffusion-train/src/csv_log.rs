//! A run's CSV files (metrics per log point, quality per epoch) that stay
//! consistent with its checkpoints: opened at the step a run resumes from,
//! a file keeps only the rows up to that step, so rows written after the
//! last checkpoint by a run that was then killed are not repeated.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::atomic::write_bytes_atomically;

/// A CSV file whose first column is the step.
#[derive(Debug)]
pub struct CsvLog {
    path: PathBuf,
    file: File,
}

impl CsvLog {
    /// Opens `path` for appending rows: its header becomes `header`, and
    /// of the rows already there only those whose step (first column) is at
    /// most `step` are kept (rewritten atomically).
    pub fn open(path: &Path, header: &str, step: u64) -> io::Result<Self> {
        let kept: Vec<String> = fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s <= step)
            })
            .map(str::to_string)
            .collect();
        let mut text = String::from(header);
        text.push('\n');
        for line in kept {
            text.push_str(&line);
            text.push('\n');
        }
        write_bytes_atomically(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one row (without its line end).
    pub fn row(&mut self, row: &str) -> io::Result<()> {
        writeln!(self.file, "{row}")
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_at_a_step_drops_the_rows_after_it() {
        let dir = std::env::temp_dir().join(format!("diffusion-csv-log-{}", std::process::id()));
        let path = dir.join("m.csv");
        let mut log = CsvLog::open(&path, "step,loss", 0).unwrap();
        for (step, loss) in [(1, 0.9), (2, 0.8), (3, 0.7), (10, 0.6)] {
            log.row(&format!("{step},{loss}")).unwrap();
        }
        drop(log);
        // Resumed from the checkpoint of step 2: rows 3 and 10 go.
        let mut log = CsvLog::open(&path, "step,loss", 2).unwrap();
        log.row("3,0.75").unwrap();
        drop(log);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "step,loss\n1,0.9\n2,0.8\n3,0.75\n");
        let _ = fs::remove_dir_all(&dir);
    }
}
