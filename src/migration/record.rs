//! `livemig dirtyrate --record FILE`: the harvests of a measurement as a
//! page-write trace that `--workload trace:FILE` replays (see
//! [`crate::guest::workload::trace`] for the format). Each harvest becomes
//! one line per page it found, stamped with the harvest's time in
//! microseconds from the start of the measurement: a page written several
//! times between two harvests is one line, which is all a tracker sees.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::guest::dirty::DirtySet;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("--record {path}: cannot write it")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A trace being written.
pub struct Recorder {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    t0: Instant,
    /// Lines written so far.
    pub writes: u64,
}

impl Recorder {
    /// Create `path`, headed by a comment saying what it holds.
    pub fn create(path: &Path, about: &str) -> Result<Self, RecordError> {
        let fail = |source| RecordError::Write {
            path: path.into(),
            source,
        };
        let file = std::fs::File::create(path).map_err(fail)?;
        let mut r = Self {
            out: std::io::BufWriter::new(file),
            path: path.into(),
            t0: Instant::now(),
            writes: 0,
        };
        writeln!(
            r.out,
            "# livemig dirtyrate --record: {about}\n# t_us page_index (harvest time, page it found written)"
        )
        .map_err(fail)?;
        Ok(r)
    }

    /// Start the clock: times count from here.
    pub fn start(&mut self, t0: Instant) {
        self.t0 = t0;
    }

    /// Record harvest `set`, taken at `at`.
    pub fn add(&mut self, at: Instant, set: &DirtySet) -> Result<(), RecordError> {
        let t = at.saturating_duration_since(self.t0).as_micros();
        for (first, count) in set.runs(u64::MAX) {
            for page in first..first + count {
                writeln!(self.out, "{t} {page}").map_err(|source| RecordError::Write {
                    path: self.path.clone(),
                    source,
                })?;
            }
            self.writes += count;
        }
        Ok(())
    }

    /// Flush; the number of writes recorded.
    pub fn finish(mut self) -> Result<u64, RecordError> {
        self.out.flush().map_err(|source| RecordError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.writes)
    }
}
