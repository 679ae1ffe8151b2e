//! Workloads: which pages a guest writes and how fast.
//!
//! A spec is `KIND[:key=value,...]`:
//! - `idle`: writes nothing;
//! - `uniform:rate=R`: random pages over all of memory;
//! - `hotset:wws=SIZE,rate=R[,hot=F]`: a writable working set of SIZE (the
//!   first SIZE bytes of memory) takes fraction F (default 0.95) of the
//!   writes, the rest go anywhere;
//! - `sweep[:from=SIZE,to=SIZE][,rate=R]`: walks [from, to) page by page and
//!   increments byte 0 of each page (QEMU's migration-test pattern; default
//!   1 MiB..100 MiB clipped to memory, rate `max`);
//! - `zipf:s=S,rate=R[,wws=SIZE]`: page popularity follows Zipf's law with
//!   exponent S > 0 over the first SIZE bytes (default: all of memory): page
//!   k (from 0) is written with weight 1/(k+1)^S, as caches and key-value
//!   stores are;
//! - `compute:ops=N,wws=SIZE`: CPU-bound arithmetic (a Livermore-loop
//!   kernel) that writes one page of its SIZE working set every N
//!   operations; its progress is operations/s ([`compute`]);
//! - `phases:SPEC@DUR+SPEC@DUR...`: each SPEC (any kind but phases) for its
//!   duration of guest run time, in turn, the list repeating
//!   ([`phases`]), e.g. `phases:idle@2s+hotset:wws=8M,rate=20k@3s`;
//! - `trace:FILE`: replays a page-write trace, lines `t_us page_index`
//!   (`#` starts a comment), in a loop ([`trace`]); `livemig dirtyrate
//!   --record FILE` records one.
//!
//! Every kind also takes content keys, which shape what data reduction
//! (zero pages, compression, XBZRLE) finds:
//! - `zero=F`: share of pages that start all-zero (default 0);
//! - `random=F`: share of each other page's bytes that start random, so
//!   incompressible (default 0: one 8-byte stamp per page, the rest zero);
//! - `bytes=N`: bytes a write stores into its page, a multiple of 8 up to the
//!   page size (default 8);
//! - `cache=F`, `layout=seq|scatter`: share of pages filled from a backing
//!   file at start, and how (see [`crate::guest::cache`]; default none, seq).
//!
//! `R` is pages per second (`20k`, `1.5M`) or `max`. The random stream is
//! counter-based (xxh3 of the operation number under a per-vCPU seed), so a
//! vCPU's whole state is its seed, its operation count and its cursor: the
//! device state that lets a migrated guest continue exactly where it stopped.

pub mod compute;
mod layout;
pub mod phases;
mod spec;
mod stream;
#[cfg(test)]
mod tests;
pub mod trace;

pub use phases::Phases;
pub use stream::{fill_word, Stream, Write};
pub use trace::{Trace, TraceError};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::util::page::PageSize;
use crate::util::units::{PageRate, UnitError};

/// Longest spec: it travels in the device state and the control block.
pub const MAX_SPEC_LEN: usize = crate::guest::control::MAX_WORKLOAD_LEN;

/// A workload spec that cannot be read, or cannot be laid over a memory.
/// Messages name the key at fault; the caller names the spec.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0} bytes long; at most {MAX_SPEC_LEN} fit in the device state")]
    TooLong(usize),
    #[error("\"{0}\" is not key=value")]
    NotKeyValue(String),
    #[error("layout=\"{0}\" is not seq or scatter")]
    CacheLayout(String),
    #[error("{0} given twice")]
    Twice(String),
    #[error("unknown kind \"{0}\" (idle, uniform, hotset, sweep, zipf, compute, phases, trace)")]
    UnknownKind(String),
    #[error("{kind} takes no \"{key}\" (it takes: {takes})")]
    UnknownKey {
        kind: String,
        key: String,
        takes: String,
    },
    #[error("{key}=\"{value}\" is not a fraction in [0, 1]")]
    Fraction { key: String, value: String },
    #[error("{key}=\"{value}\"")]
    Unit {
        key: String,
        value: String,
        #[source]
        source: UnitError,
    },
    #[error("{0} needs rate=R (pages/s like 50k, or max)")]
    NeedsRate(String),
    #[error("hotset needs wws=SIZE")]
    NeedsWws,
    #[error("bytes={bytes} must be a multiple of 8 between 8 and the page size ({page_size})")]
    WriteBytes { bytes: u64, page_size: u64 },
    #[error("wws must be between one page and the memory size ({memory_bytes} bytes)")]
    Wws { memory_bytes: u64 },
    #[error("sweep range is empty: from page {from} to page {to} (memory has {pages} pages)")]
    EmptySweep { from: u64, to: u64, pages: u64 },
    /// A sweep splits its range between the vCPUs, so it needs a page each.
    #[error("the sweep range has {pages} pages, fewer than its {vcpus} vCPUs")]
    FewerPagesThanVcpus { pages: u64, vcpus: u32 },
    #[error("zipf needs s=S, an exponent above 0")]
    NeedsExponent,
    #[error("s=\"{0}\" is not an exponent above 0 (1 is the classic Zipf's law)")]
    Exponent(String),
    #[error("compute needs ops=N (arithmetic operations per page written) and wws=SIZE")]
    NeedsOps,
    #[error("ops=\"{0}\" is not a whole number of operations above 0")]
    Ops(String),
    #[error("phases needs SPEC@DURATION items joined by + (like idle@2s+uniform:rate=1k@3s)")]
    NoPhases,
    #[error("phase \"{0}\" has no @DURATION")]
    PhaseDuration(String),
    /// `phase` is the item with its `@DURATION`.
    #[error("phase \"{phase}\": bad @DURATION")]
    PhaseTime {
        phase: String,
        #[source]
        source: UnitError,
    },
    #[error("phase \"{phase}\"")]
    Phase {
        phase: String,
        #[source]
        source: Box<WorkloadError>,
    },
    #[error("phases cannot nest")]
    NestedPhases,
    #[error("the phases sum to zero time")]
    ZeroPhases,
    #[error("trace needs a file: trace:FILE")]
    NeedsTraceFile,
    #[error("trace \"{path}\"")]
    Trace {
        path: String,
        #[source]
        source: trace::Failure,
    },
}

/// The shape of a workload's writes, as the spec gives it (in bytes).
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Idle,
    Uniform,
    HotSet {
        wws_bytes: u64,
        hot: f64,
    },
    /// None: the default (1 MiB..100 MiB, clipped to memory).
    Sweep {
        from_bytes: Option<u64>,
        to_bytes: Option<u64>,
    },
    /// None: over all of memory.
    Zipf {
        s: f64,
        wws_bytes: Option<u64>,
    },
    Compute {
        ops: u64,
        wws_bytes: u64,
    },
    /// Each workload for its duration, in turn, repeating.
    Phases(Vec<(Workload, Duration)>),
    Trace(String),
}

/// The shape of a workload's writes over a memory (in pages).
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    Idle,
    Uniform,
    HotSet {
        wws_pages: u64,
        hot: f64,
    },
    Sweep {
        from_page: u64,
        to_page: u64,
    },
    /// Page k of the first `pages` written with weight 1/(k+1)^s.
    Zipf {
        pages: u64,
        s: f64,
        zipf: rand_distr::Zipf<f64>,
    },
    /// One write into the first `wws_pages` every `ops` operations.
    Compute {
        ops: u64,
        wws_pages: u64,
    },
    Phases(Arc<Phases>),
    Trace(Arc<Trace>),
}

/// What the pages hold: the initial content and the size of each write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Content {
    /// Share of pages that start all-zero.
    pub zero: f64,
    /// Share of each non-zero page's bytes that start random.
    pub random: f64,
    /// Bytes one write stores (a multiple of 8, at most a page).
    pub write_bytes: u64,
    /// Page cache read from a backing file at start (`cache=F`).
    pub cache: Option<crate::guest::cache::Cache>,
}

impl Default for Content {
    fn default() -> Self {
        Self {
            zero: 0.0,
            random: 0.0,
            write_bytes: 8,
            cache: None,
        }
    }
}

/// A workload as its spec says (`--workload`), whatever the memory: parse
/// it once with [`FromStr`], lay it over a memory with [`Workload::layout`].
/// It prints as the spec it was read from.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    spec: String,
    pub kind: Kind,
    pub rate: PageRate,
    pub content: Content,
}

/// The spec as given.
impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

/// As its spec: how the device state carries it.
impl serde::Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.spec)
    }
}

impl<'de> serde::Deserialize<'de> for Workload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(d)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}
impl Workload {
    /// Whether its progress is counted in operations (compute, alone or
    /// in a phase) rather than writes.
    pub fn counts_operations(&self) -> bool {
        match &self.kind {
            Kind::Compute { .. } => true,
            Kind::Phases(list) => list.iter().any(|(w, _)| w.counts_operations()),
            _ => false,
        }
    }

    /// The spec as given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn is_idle(&self) -> bool {
        self.kind == Kind::Idle
    }
}

/// A workload laid over a memory: the pages it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub workload: Workload,
    pub pattern: Pattern,
    pub rate: PageRate,
    pub content: Content,
    pub page_count: u64,
    pub page_size: PageSize,
}

impl Layout {
    pub fn is_idle(&self) -> bool {
        self.pattern == Pattern::Idle
    }

    /// The layout writing at guest time `t` (a phase's, or this one) and
    /// how long it writes from `t` (None: for ever).
    pub fn at(&self, t: Duration) -> (&Layout, Option<Duration>) {
        match &self.pattern {
            Pattern::Phases(p) => {
                let (i, left) = p.at(t);
                (&p.items[i].0, Some(left))
            }
            _ => (self, None),
        }
    }

    /// Whether vCPUs keep a guest clock for this workload (phases do).
    pub fn is_phased(&self) -> bool {
        matches!(self.pattern, Pattern::Phases(_))
    }

    /// The per-vCPU share of the rate (None = as fast as possible).
    pub fn rate_per_vcpu(&self, vcpus: u32) -> Option<f64> {
        match self.rate {
            PageRate::Max => None,
            PageRate::PerSec(r) => Some(r / f64::from(vcpus)),
        }
    }

    /// A sweep splits its range between the vCPUs, so it needs a page each.
    pub fn check_vcpus(&self, vcpus: u32) -> Result<(), WorkloadError> {
        match &self.pattern {
            Pattern::Phases(p) => p.items.iter().try_for_each(|(l, _)| l.check_vcpus(vcpus)),
            &Pattern::Sweep { from_page, to_page } if to_page - from_page < u64::from(vcpus) => {
                Err(WorkloadError::FewerPagesThanVcpus {
                    pages: to_page - from_page,
                    vcpus,
                })
            }
            _ => Ok(()),
        }
    }

    /// The part of a sweep that vCPU `vcpu` of `vcpus` walks: sweeps split
    /// the range so vCPUs never write the same page (see `check_vcpus`).
    pub fn sweep_slice(&self, vcpu: u32, vcpus: u32) -> (u64, u64) {
        let Pattern::Sweep { from_page, to_page } = self.pattern else {
            return (0, self.page_count);
        };
        let len = to_page - from_page;
        let lo = from_page + len * u64::from(vcpu) / u64::from(vcpus);
        let hi = from_page + len * u64::from(vcpu + 1) / u64::from(vcpus);
        (lo, hi.max(lo + 1))
    }
}
