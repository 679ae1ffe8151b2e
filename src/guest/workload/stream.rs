//! One vCPU's deterministic stream of writes.

use rand::SeedableRng;
use rand_distr::Distribution;

use super::{Content, Layout, Pattern};
use crate::util::page::PageSize;

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
    /// (this vCPU, of how many): a trace is dealt out between them.
    lane: (u32, u32),
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
            lane: (vcpu, vcpus),
        }
    }

    /// Start writing phase `w` (a sweep restarts at its slice's start).
    pub fn enter(&mut self, w: &Layout) {
        self.slice = w.sweep_slice(self.lane.0, self.lane.1);
        self.cursor = self.slice.0;
    }

    /// When write `n` of a trace replay is due, microseconds from the
    /// replay's start (None: not a trace, no schedule of its own).
    #[inline]
    pub fn due_us(&self, w: &Layout, n: u64) -> Option<u64> {
        match &w.pattern {
            Pattern::Trace(t) => Some(t.at(n, self.lane.0, self.lane.1).1),
            _ => None,
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
            Pattern::Zipf { pages, .. } => (0, pages),
            Pattern::Compute { wws_pages, .. } => (0, wws_pages),
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
        let page = match &w.pattern {
            Pattern::Idle => unreachable!("idle workloads do not write"),
            Pattern::Zipf { pages, zipf, .. } => {
                // A generator per write, seeded from the counter: the
                // stream stays a function of (seed, n), however many draws
                // the rejection sampler takes.
                let mut rng = rand::rngs::SmallRng::seed_from_u64(r);
                // f64 -> u64: Zipf draws a whole rank in [1, pages].
                (zipf.sample(&mut rng) as u64).clamp(1, *pages) - 1
            }
            Pattern::Compute { wws_pages, .. } => r % wws_pages,
            Pattern::Trace(t) => t.writes[t.at(n, self.lane.0, self.lane.1).0].1,
            Pattern::Phases(p) => {
                // Writers pick the phase by time ([`Layout::at`]); a caller
                // without a clock gets the first phase that writes.
                self.ops = n;
                let first = p.items.iter().map(|(l, _)| l).find(|l| !l.is_idle());
                return self.next(first.expect("a phased workload that writes"));
            }
            Pattern::Uniform => r % w.page_count,
            &Pattern::HotSet { wws_pages, hot } => {
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
