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
//!   1 MiB..100 MiB clipped to memory, rate `max`).
//!
//! Every kind also takes content keys, which shape what data reduction
//! (zero pages, compression, XBZRLE) finds:
//! - `zero=F`: share of pages that start all-zero (default 0);
//! - `random=F`: share of each other page's bytes that start random, so
//!   incompressible (default 0: one 8-byte stamp per page, the rest zero);
//! - `bytes=N`: bytes a write stores into its page, a multiple of 8 up to the
//!   page size (default 8).
//!
//! `R` is pages per second (`20k`, `1.5M`) or `max`. The random stream is
//! counter-based (xxh3 of the operation number under a per-vCPU seed), so a
//! vCPU's whole state is its seed, its operation count and its cursor: the
//! device state that lets a migrated guest continue exactly where it stopped.

use std::fmt;
use std::str::FromStr;

use crate::util::page::PageSize;
use crate::util::units::{parse_bytes, parse_page_rate, PageRate, UnitError};

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
    #[error("{0} given twice")]
    Twice(String),
    #[error("unknown kind \"{0}\" (idle, uniform, hotset, sweep)")]
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
}

/// The shape of a workload's writes over a memory (in pages).
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    Idle,
    Uniform,
    HotSet { wws_pages: u64, hot: f64 },
    Sweep { from_page: u64, to_page: u64 },
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
}

impl Default for Content {
    fn default() -> Self {
        Self {
            zero: 0.0,
            random: 0.0,
            write_bytes: 8,
        }
    }
}

/// Keys every kind takes (the content model).
const CONTENT_KEYS: [&str; 3] = ["zero", "random", "bytes"];

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

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(spec: &str) -> Result<Self, WorkloadError> {
        if spec.len() > MAX_SPEC_LEN {
            return Err(WorkloadError::TooLong(spec.len()));
        }
        let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
        let mut kv = std::collections::BTreeMap::new();
        for part in args.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| WorkloadError::NotKeyValue(part.into()))?;
            if kv.insert(k, v).is_some() {
                return Err(WorkloadError::Twice(k.into()));
            }
        }
        let allowed: &[&str] = match kind {
            "idle" => &[],
            "uniform" => &["rate"],
            "hotset" => &["wws", "rate", "hot"],
            "sweep" => &["from", "to", "rate"],
            _ => return Err(WorkloadError::UnknownKind(kind.into())),
        };
        if let Some(k) = kv
            .keys()
            .find(|k| !allowed.contains(k) && !CONTENT_KEYS.contains(k))
        {
            let takes: Vec<&str> = allowed.iter().chain(&CONTENT_KEYS).copied().collect();
            return Err(WorkloadError::UnknownKey {
                kind: kind.into(),
                key: (*k).into(),
                takes: takes.join(", "),
            });
        }
        let unit = |k: &str, v: &str, source| WorkloadError::Unit {
            key: k.into(),
            value: v.into(),
            source,
        };
        let fraction = |k: &str| -> Result<Option<f64>, WorkloadError> {
            kv.get(k)
                .map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|f| (0.0..=1.0).contains(f))
                        .ok_or_else(|| WorkloadError::Fraction {
                            key: k.into(),
                            value: (*v).into(),
                        })
                })
                .transpose()
        };
        let size = |k: &str| -> Result<Option<u64>, WorkloadError> {
            kv.get(k)
                .map(|v| parse_bytes(v).map_err(|e| unit(k, v, e)))
                .transpose()
        };
        let rate = match kv.get("rate") {
            Some(v) => parse_page_rate(v).map_err(|e| unit("rate", v, e))?,
            None if kind == "uniform" || kind == "hotset" => {
                return Err(WorkloadError::NeedsRate(kind.into()))
            }
            None => PageRate::Max,
        };
        let pattern = match kind {
            "idle" => Kind::Idle,
            "uniform" => Kind::Uniform,
            "hotset" => Kind::HotSet {
                wws_bytes: size("wws")?.ok_or(WorkloadError::NeedsWws)?,
                hot: fraction("hot")?.unwrap_or(0.95),
            },
            _ => Kind::Sweep {
                from_bytes: size("from")?,
                to_bytes: size("to")?,
            },
        };
        let write_bytes = size("bytes")?.unwrap_or(8);
        if write_bytes == 0 || write_bytes % 8 != 0 {
            return Err(WorkloadError::WriteBytes {
                bytes: write_bytes,
                page_size: PageSize::host().as_u64(),
            });
        }
        Ok(Self {
            spec: spec.into(),
            kind: pattern,
            rate,
            content: Content {
                zero: fraction("zero")?.unwrap_or(0.0),
                random: fraction("random")?.unwrap_or(0.0),
                write_bytes,
            },
        })
    }
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
    /// The spec as given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn is_idle(&self) -> bool {
        self.kind == Kind::Idle
    }

    /// This workload over `memory_bytes` of `page_size`-byte pages.
    pub fn layout(&self, memory_bytes: u64, page_size: PageSize) -> Result<Layout, WorkloadError> {
        let page_count = page_size.pages(memory_bytes);
        let pattern = match self.kind {
            Kind::Idle => Pattern::Idle,
            Kind::Uniform => Pattern::Uniform,
            Kind::HotSet { wws_bytes, hot } => {
                let wws_pages = page_size.pages_ceil(wws_bytes);
                if wws_pages == 0 || wws_pages > page_count {
                    return Err(WorkloadError::Wws { memory_bytes });
                }
                Pattern::HotSet { wws_pages, hot }
            }
            Kind::Sweep {
                from_bytes,
                to_bytes,
            } => {
                let from = page_size.pages(from_bytes.unwrap_or(1 << 20));
                let to = page_size
                    .pages(to_bytes.unwrap_or(100 << 20))
                    .min(page_count);
                if from >= to {
                    return Err(WorkloadError::EmptySweep {
                        from,
                        to,
                        pages: page_count,
                    });
                }
                Pattern::Sweep {
                    from_page: from,
                    to_page: to,
                }
            }
        };
        if self.content.write_bytes > page_size.as_u64() {
            return Err(WorkloadError::WriteBytes {
                bytes: self.content.write_bytes,
                page_size: page_size.as_u64(),
            });
        }
        Ok(Layout {
            workload: self.clone(),
            pattern,
            rate: self.rate,
            content: self.content,
            page_count,
            page_size,
        })
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

    /// The per-vCPU share of the rate (None = as fast as possible).
    pub fn rate_per_vcpu(&self, vcpus: u32) -> Option<f64> {
        match self.rate {
            PageRate::Max => None,
            PageRate::PerSec(r) => Some(r / f64::from(vcpus)),
        }
    }

    /// A sweep splits its range between the vCPUs, so it needs a page each.
    pub fn check_vcpus(&self, vcpus: u32) -> Result<(), WorkloadError> {
        match self.pattern {
            Pattern::Sweep { from_page, to_page } if to_page - from_page < u64::from(vcpus) => {
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

/// What one write operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Store `len` bytes at byte `offset` of `page`: `value` as a u64, then
    /// words derived from it ([`fill_word`]).
    Store {
        page: u64,
        offset: u64,
        value: u64,
        len: u64,
    },
    /// Increment byte 0 of `page` (sweep).
    Increment { page: u64 },
}

impl Write {
    /// The page this write lands on.
    pub fn page(&self) -> u64 {
        match *self {
            Self::Store { page, .. } | Self::Increment { page } => page,
        }
    }
}

/// One vCPU's deterministic stream of writes.
#[derive(Clone, Debug)]
pub struct Stream {
    pub seed: u64,
    /// Operations done so far.
    pub ops: u64,
    /// Next page of a sweep.
    pub cursor: u64,
    slice: (u64, u64),
}

fn rand(seed: u64, n: u64, lane: u64) -> u64 {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..].copy_from_slice(&lane.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(&b, seed)
}

/// The top 53 bits of `r` as a uniform fraction in [0, 1).
fn unit(r: u64) -> f64 {
    (r >> 11) as f64 / (1u64 << 53) as f64
}

impl Stream {
    /// A stream for vCPU `vcpu`, starting fresh or from a saved state.
    pub fn new(
        w: &Layout,
        vcpu: u32,
        vcpus: u32,
        seed: u64,
        ops: u64,
        cursor: Option<u64>,
    ) -> Self {
        let slice = w.sweep_slice(vcpu, vcpus);
        Self {
            seed,
            ops,
            cursor: cursor.unwrap_or(slice.0).clamp(slice.0, slice.1 - 1),
            slice,
        }
    }

    /// Advance past `n` writes without computing them (a simulation of a
    /// stretch that saturates the pattern): the state is as if they ran.
    pub fn skip(&mut self, w: &Layout, n: u64) {
        self.ops = self.ops.wrapping_add(n);
        if let Pattern::Sweep { .. } = w.pattern {
            let len = self.slice.1 - self.slice.0;
            self.cursor = self.slice.0 + (self.cursor - self.slice.0 + n % len) % len;
        }
    }

    /// The pages this stream can write, as (first, count).
    pub fn reach(&self, w: &Layout) -> (u64, u64) {
        match w.pattern {
            Pattern::HotSet { wws_pages, hot } if hot >= 1.0 => (0, wws_pages),
            Pattern::Sweep { .. } => (self.slice.0, self.slice.1 - self.slice.0),
            _ => (0, w.page_count),
        }
    }

    /// The next write; advances the state.
    #[inline]
    pub fn next(&mut self, w: &Layout) -> Write {
        let n = self.ops;
        self.ops = self.ops.wrapping_add(1);
        let r = rand(self.seed, n, 0);
        let page = match w.pattern {
            Pattern::Idle => unreachable!("idle workloads do not write"),
            Pattern::Uniform => r % w.page_count,
            Pattern::HotSet { wws_pages, hot } => {
                if unit(rand(self.seed, n, 1)) < hot {
                    r % wws_pages
                } else {
                    r % w.page_count
                }
            }
            Pattern::Sweep { .. } => {
                let page = self.cursor;
                self.cursor = if page + 1 >= self.slice.1 {
                    self.slice.0
                } else {
                    page + 1
                };
                return Write::Increment { page };
            }
        };
        let (slots, words) = (w.page_size.as_u64() / 8, w.content.write_bytes / 8);
        Write::Store {
            page,
            offset: (r >> 32) % (slots - words + 1) * 8,
            value: n,
            len: w.content.write_bytes,
        }
    }
}

/// Word `k` of a write or fill seeded by `value`: a cheap mix (splitmix64's
/// finaliser), random enough to defeat compression.
#[inline]
pub fn fill_word(value: u64, k: u64) -> u64 {
    let mut z = value
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(k.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Content {
    /// Whether page `page` of a guest seeded with `seed` starts all-zero.
    pub fn starts_zero(&self, seed: u64, page: u64) -> bool {
        self.zero > 0.0 && unit(rand(seed, page, 2)) < self.zero
    }

    /// Random words at the start of each non-zero page.
    pub fn random_words(&self, page_size: PageSize) -> u64 {
        (self.random * (page_size.as_u64() / 8) as f64).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn parse(s: &str) -> Result<Layout, WorkloadError> {
        s.parse::<Workload>()?.layout(64 * MIB, PageSize::MIN)
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(parse("idle").unwrap().pattern, Pattern::Idle);
        let u = parse("uniform:rate=20k").unwrap();
        assert_eq!(
            (u.pattern, u.rate),
            (Pattern::Uniform, PageRate::PerSec(20_000.0))
        );
        let h = parse("hotset:wws=32M,rate=1.5M").unwrap();
        assert_eq!(
            h.pattern,
            Pattern::HotSet {
                wws_pages: 8192,
                hot: 0.95
            }
        );
        assert_eq!(h.rate, PageRate::PerSec(1_500_000.0));
        let s = parse("sweep").unwrap();
        // Default 1 MiB..100 MiB, clipped to 64 MiB of memory.
        assert_eq!(
            s.pattern,
            Pattern::Sweep {
                from_page: 256,
                to_page: 16384
            }
        );
        assert_eq!(s.rate, PageRate::Max);
        assert_eq!(
            parse("hotset:wws=1M,rate=max,hot=0.5").unwrap().rate,
            PageRate::Max
        );
    }

    #[test]
    fn rejects_bad_specs_naming_the_problem() {
        for (spec, needle) in [
            ("busy", "unknown kind \"busy\""),
            ("uniform", "needs rate"),
            ("uniform:rate=fast", "fast"),
            ("hotset:rate=1k", "needs wws"),
            ("hotset:wws=1G,rate=1k", "wws must be"),
            ("hotset:wws=1M,rate=1k,hot=2", "hot=\"2\""),
            ("idle:rate=1k", "idle takes no \"rate\""),
            ("sweep:from=100M", "range is empty"),
            ("uniform:rate", "not key=value"),
            ("idle:zero=1.5", "zero=\"1.5\""),
            ("idle:random=x", "random=\"x\""),
            (
                "uniform:rate=1k,bytes=12",
                "bytes=12 must be a multiple of 8",
            ),
            ("uniform:rate=1k,bytes=8K", "bytes=8192"),
            (
                "sweep:hot=1",
                "it takes: from, to, rate, zero, random, bytes",
            ),
        ] {
            let e = parse(spec).unwrap_err();
            let e = crate::util::error::error_chain(&e);
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn a_spec_prints_as_given_and_reads_back() {
        for spec in [
            "idle",
            "uniform:rate=20k",
            "hotset:wws=32M,rate=50k,hot=0.9",
            "sweep:from=0,to=16K,zero=0.5,bytes=64",
        ] {
            let w: Workload = spec.parse().unwrap();
            assert_eq!(w.to_string(), spec);
            assert_eq!(w.to_string().parse::<Workload>(), Ok(w.clone()));
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(json, format!("\"{spec}\""));
            assert_eq!(serde_json::from_str::<Workload>(&json).unwrap(), w);
        }
        // Memory-free errors come at parse time, the rest when laid out.
        assert!("busy".parse::<Workload>().is_err());
        let big: Workload = "hotset:wws=1G,rate=1k".parse().unwrap();
        assert_eq!(
            big.layout(64 * MIB, PageSize::MIN),
            Err(WorkloadError::Wws {
                memory_bytes: 64 * MIB
            })
        );
    }

    #[test]
    fn hotset_keeps_writes_in_the_set() {
        let w = parse("hotset:wws=1M,rate=max,hot=1").unwrap();
        let mut s = Stream::new(&w, 0, 1, 7, 0, None);
        for _ in 0..10_000 {
            let Write::Store {
                page, offset, len, ..
            } = s.next(&w)
            else {
                panic!()
            };
            assert!(page < 256 && offset % 8 == 0 && offset < 4096 && len == 8);
        }
        // Wider writes stay inside their page.
        let w = parse("uniform:rate=max,bytes=4K").unwrap();
        let mut s = Stream::new(&w, 0, 1, 7, 0, None);
        let Write::Store { offset, len, .. } = s.next(&w) else {
            panic!()
        };
        assert_eq!((offset, len), (0, 4096));
    }

    #[test]
    fn content_keys_shape_the_pages() {
        let w = parse("idle:zero=0.25,random=0.5,bytes=64").unwrap();
        assert_eq!(w.content.write_bytes, 64);
        assert_eq!(w.content.random_words(PageSize::MIN), 256);
        let zero = (0..10_000).filter(|&p| w.content.starts_zero(3, p)).count();
        assert!((2300..2700).contains(&zero), "{zero} of 10000 pages zero");
        assert!(!(0..1000).any(|p| parse("idle").unwrap().content.starts_zero(3, p)));
    }

    #[test]
    fn skipping_writes_leaves_the_state_they_would() {
        for spec in ["uniform:rate=1k", "sweep:from=4K,to=40K"] {
            let w = spec
                .parse::<Workload>()
                .unwrap()
                .layout(1 << 20, PageSize::MIN)
                .unwrap();
            let (mut a, mut b) = (
                Stream::new(&w, 1, 2, 9, 0, None),
                Stream::new(&w, 1, 2, 9, 0, None),
            );
            (0..1000).for_each(|_| {
                a.next(&w);
            });
            b.skip(&w, 1000);
            assert_eq!((a.ops, a.cursor), (b.ops, b.cursor), "{spec}");
            assert_eq!(a.next(&w), b.next(&w), "{spec}");
        }
    }

    #[test]
    fn a_resumed_stream_continues_the_same_sequence() {
        let w = parse("uniform:rate=1k").unwrap();
        let mut a = Stream::new(&w, 0, 1, 42, 0, None);
        let first: Vec<_> = (0..100).map(|_| a.next(&w)).collect();
        let mut b = Stream::new(&w, 0, 1, 42, 50, None);
        assert_eq!(b.next(&w), first[50]);
        let sw = parse("sweep:from=0,to=16K").unwrap();
        let mut c = Stream::new(&sw, 0, 1, 1, 0, None);
        let seq: Vec<_> = (0..9).map(|_| c.next(&sw)).collect();
        assert_eq!(seq[4], Write::Increment { page: 0 }, "wraps after 4 pages");
        let mut d = Stream::new(&sw, 0, 1, 1, 5, Some(c.cursor));
        assert_eq!(d.next(&sw), Write::Increment { page: 1 });
    }

    #[test]
    fn sweep_slices_partition_the_range() {
        let w = parse("sweep:from=0,to=1M").unwrap();
        let parts: Vec<_> = (0..3).map(|v| w.sweep_slice(v, 3)).collect();
        assert_eq!(parts, vec![(0, 85), (85, 170), (170, 256)]);
        let tiny = parse("sweep:from=0,to=8K").unwrap();
        assert!(tiny.check_vcpus(2).is_ok());
        assert_eq!(
            tiny.check_vcpus(3),
            Err(WorkloadError::FewerPagesThanVcpus { pages: 2, vcpus: 3 })
        );
    }
}
