//! `trace:FILE`: replay a recorded page-write trace.
//!
//! A trace is text, one write a line: `t_us page_index` (microseconds from
//! the trace's start, and the page written); `#` starts a comment, blank
//! lines are skipped. Lines are replayed in time order (a stable sort, so
//! writes with one timestamp keep their order) and the replay loops with a
//! period of the last timestamp plus the first (the gap before the first
//! write repeats after the last). With several vCPUs, vCPU `i` of `v`
//! replays writes `i, i+v, i+2v, ...` of the endless sequence, so together
//! they replay every write once per loop. `livemig dirtyrate --record FILE`
//! writes traces in this format (harvest times and the pages harvested).

use std::path::Path;
use std::sync::Arc;

/// Most writes a trace may hold (16 bytes each in every guest that replays it).
pub const MAX_TRACE_WRITES: usize = 16 << 20;

/// Why a trace cannot be replayed; line numbers count from 1.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("line {line}: \"{text}\" is not `t_us page_index` (two whole numbers)")]
    Malformed { line: usize, text: String },
    #[error("line {line}: page {page} is beyond the memory's {pages} pages")]
    PageBeyond { line: usize, page: u64, pages: u64 },
    #[error("it holds no writes")]
    Empty,
    #[error("more than {MAX_TRACE_WRITES} writes")]
    TooLong,
}

/// A [`TraceError`] shared, so [`super::WorkloadError`] stays `Clone` and
/// `PartialEq` (two failures are equal when they are the same one).
#[derive(Clone, Debug)]
pub struct Failure(pub Arc<TraceError>);

impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A trace read and checked against a memory of `pages` pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// (t_us, page), in time order.
    pub writes: Vec<(u64, u64)>,
    /// One loop of the replay, microseconds (at least 1).
    pub period_us: u64,
}

impl Trace {
    /// Read the trace at `path` for a memory of `pages` pages.
    pub fn load(path: &Path, pages: u64) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(TraceError::Read)?;
        Self::parse(&text, pages)
    }

    /// Read a trace's text for a memory of `pages` pages.
    pub fn parse(text: &str, pages: u64) -> Result<Self, TraceError> {
        let mut writes = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let malformed = || TraceError::Malformed {
                line: i + 1,
                text: crate::util::text::printable(raw, 60),
            };
            let mut words = line.split_whitespace();
            let (Some(t), Some(p), None) = (words.next(), words.next(), words.next()) else {
                return Err(malformed());
            };
            let (Ok(t), Ok(page)) = (t.parse::<u64>(), p.parse::<u64>()) else {
                return Err(malformed());
            };
            if page >= pages {
                return Err(TraceError::PageBeyond {
                    line: i + 1,
                    page,
                    pages,
                });
            }
            if writes.len() == MAX_TRACE_WRITES {
                return Err(TraceError::TooLong);
            }
            writes.push((t, page));
        }
        writes.sort_by_key(|&(t, _)| t);
        let (first, last) = match (writes.first(), writes.last()) {
            (Some(f), Some(l)) => (f.0, l.0),
            _ => return Err(TraceError::Empty),
        };
        Ok(Self {
            writes,
            period_us: last.saturating_add(first).max(1),
        })
    }

    /// Write `n` of vCPU `vcpu` of `vcpus`: its index in the trace and
    /// when it is due, microseconds from the start of the replay.
    #[inline]
    pub fn at(&self, n: u64, vcpu: u32, vcpus: u32) -> (usize, u64) {
        let len = self.writes.len() as u64;
        let g = n
            .wrapping_mul(u64::from(vcpus))
            .wrapping_add(u64::from(vcpu));
        // usize from a value below the Vec's length.
        let i = (g % len) as usize;
        let t = (g / len)
            .wrapping_mul(self.period_us)
            .wrapping_add(self.writes[i].0);
        (i, t)
    }
}
