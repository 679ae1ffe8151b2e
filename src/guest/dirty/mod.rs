//! Dirty tracking: which pages were written since the last harvest.
//!
//! Every tracker implements [`Tracker`]: `harvest` adds the pages written
//! since the previous harvest to a [`DirtySet`] and resets the tracker's own
//! record, so no write falls between two harvests. Trackers (`--tracker`):
//! - [`bitmap`]: the guest marks a shared bitmap itself (KVM's dirty log kept
//!   in software). Needs the guest's help.
//! - `uffd-wp` ([`pagemap`]): the kernel's asynchronous userfaultfd write
//!   protection, harvested with `PAGEMAP_SCAN` from outside the guest. The
//!   default where the kernel has it (Linux 6.7+).
//! - [`mprotect`]: write protection with `mprotect` and a SIGSEGV handler in
//!   the guest process. Slow and portable: a lesson in why VMMs moved on.
//! - `soft-dirty` ([`pagemap`]): `/proc/<pid>/clear_refs` and pagemap bit 55,
//!   where the kernel has `CONFIG_MEM_SOFT_DIRTY`.

pub mod bitmap;
pub mod mprotect;
pub mod pagemap;
pub mod split;

use std::sync::{Arc, OnceLock};

use nix::errno::Errno;

use crate::guest::control::Control;
use crate::guest::memory::MemoryError;
use crate::guest::uffd::UffdError;
use crate::util::bitmap::{word_masks, Runs};
use crate::util::page::PageSize;
pub use bitmap::{BitmapTracker, SharedBitmap};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// `reason` is shared: the kernel is probed once per process.
    #[error("tracker {tracker} is not available here (use {instead})")]
    Unsupported {
        tracker: &'static str,
        #[source]
        reason: Arc<DirtyError>,
        instead: &'static str,
    },
    #[error("the kernel lacks CONFIG_MEM_SOFT_DIRTY (pagemap bit 55 stays clear after a write)")]
    NoSoftDirty,
    #[error("PAGEMAP_SCAN did not report a page written after protection")]
    ScanMissedWrite,
    #[error("cannot use {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PAGEMAP_SCAN of process {pid} failed: {errno}{}", match *errno {
        Errno::EPERM => " (its memory is not registered for asynchronous write protection: is it a guest started with the uffd-wp tracker?)",
        Errno::ESRCH => " (the process has exited)",
        _ => "",
    })]
    Scan { pid: i32, errno: Errno },
    #[error("the guest (pid {pid}) {what}")]
    Guest { pid: i32, what: String },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A tracker name livemig does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tracker (available: {list})", list = TrackerKind::NAMES.join(", "))]
pub struct UnknownTracker;

impl std::str::FromStr for TrackerKind {
    type Err = UnknownTracker;
    fn from_str(s: &str) -> Result<Self, UnknownTracker> {
        Self::NAMES
            .iter()
            .position(|&n| n == s)
            .map(|i| Self::ALL[i])
            .ok_or(UnknownTracker)
    }
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Trackers livemig knows (`--tracker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    Bitmap,
    UffdWp,
    Mprotect,
    SoftDirty,
}

impl TrackerKind {
    pub const ALL: [Self; 4] = [Self::UffdWp, Self::Bitmap, Self::Mprotect, Self::SoftDirty];
    pub const NAMES: [&'static str; 4] = ["uffd-wp", "bitmap", "mprotect", "soft-dirty"];

    pub fn as_str(&self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|k| k == self).expect("in ALL")]
    }

    /// `given`, checked against the kernel, or (None) the default:
    /// `uffd-wp` where the kernel has it, else `bitmap` with the reason
    /// uffd-wp is not usable (for a notice).
    pub fn choose(given: Option<Self>) -> Result<(Self, Option<Arc<DirtyError>>), DirtyError> {
        match given {
            Some(kind) => {
                kind.check_kernel()?;
                Ok((kind, None))
            }
            None => match Self::UffdWp.check_kernel() {
                Ok(()) => Ok((Self::UffdWp, None)),
                Err(DirtyError::Unsupported { reason, .. }) => Ok((Self::Bitmap, Some(reason))),
                Err(e) => Err(e),
            },
        }
    }

    /// Whether this kernel offers what the tracker needs (probed once, in
    /// this process: the guest runs on the same kernel).
    pub fn check_kernel(self) -> Result<(), DirtyError> {
        type Probe = OnceLock<Result<(), Arc<DirtyError>>>;
        static UFFD_WP: Probe = OnceLock::new();
        static SOFT_DIRTY: Probe = OnceLock::new();
        let (probe, instead) = match self {
            Self::Bitmap | Self::Mprotect => return Ok(()),
            Self::UffdWp => (
                UFFD_WP.get_or_init(|| pagemap::probe_uffd_wp().map_err(Arc::new)),
                "bitmap or mprotect",
            ),
            Self::SoftDirty => (
                SOFT_DIRTY.get_or_init(|| match pagemap::soft_dirty_supported() {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Arc::new(DirtyError::NoSoftDirty)),
                    Err(e) => Err(Arc::new(e)),
                }),
                "uffd-wp, bitmap or mprotect",
            ),
        };
        probe.clone().map_err(|reason| DirtyError::Unsupported {
            tracker: self.as_str(),
            reason,
            instead,
        })
    }

    /// Whether the tracker records into the shared bitmap (guest or handler).
    pub fn uses_bitmap(self) -> bool {
        matches!(self, Self::Bitmap | Self::Mprotect)
    }
}

/// The guest a sender-side tracker watches.
pub struct Target {
    pub pid: i32,
    /// Where guest memory is mapped in the guest's address space.
    pub addr: u64,
    pub pages: u64,
    pub page_size: PageSize,
}

/// Open the sender side of `kind` over `target` (`bitmap` for the trackers
/// that use one, `control` for `mprotect`).
pub fn open(
    kind: TrackerKind,
    target: &Target,
    bitmap: Option<SharedBitmap>,
    control: &Control,
) -> Result<Box<dyn Tracker>, DirtyError> {
    let pagemap =
        || pagemap::Pagemap::open(target.pid, target.addr, target.pages, target.page_size);
    let bitmap = || bitmap.expect("bitmap trackers are given their bitmap");
    Ok(match kind {
        TrackerKind::Bitmap => Box::new(BitmapTracker::new(bitmap())),
        TrackerKind::UffdWp => Box::new(pagemap::UffdWpTracker::new(pagemap()?)),
        TrackerKind::SoftDirty => Box::new(pagemap::SoftDirtyTracker::new(pagemap()?)?),
        TrackerKind::Mprotect => Box::new(mprotect::MprotectTracker::new(
            bitmap(),
            control.clone(),
            target.pid,
        )),
    })
}

/// A round's set of pages, owned by one thread: words of bits, laid out as
/// [`crate::util::bitmap::AtomicBitmap`]'s so a harvest ors words across.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySet {
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; crate::util::bitmap::words_for(pages)],
            pages,
        }
    }

    /// Every page (round 0).
    pub fn all(pages: u64) -> Self {
        let mut s = Self::new(pages);
        s.words.fill(u64::MAX);
        if !pages.is_multiple_of(64) {
            if let Some(last) = s.words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        s
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Panics unless pages `first..first + count` are in the set.
    fn check_range(&self, first: u64, count: u64) {
        let end = first.checked_add(count).expect("page range overflows");
        assert!(
            end <= self.pages,
            "pages {first}+{count} outside {} pages",
            self.pages
        );
    }

    /// Set `count` pages from `first`, a word at a time.
    pub fn set_range(&mut self, first: u64, count: u64) {
        self.check_range(first, count);
        for (i, mask) in word_masks(first, count) {
            self.words[i] |= mask;
        }
    }

    /// Clear `count` pages from `first`, a word at a time.
    pub fn clear_range(&mut self, first: u64, count: u64) {
        self.check_range(first, count);
        for (i, mask) in word_masks(first, count) {
            self.words[i] &= !mask;
        }
    }

    /// Clear the pages from `from` up to `to`, wrapping past the last page
    /// when `to` < `from` (what a pass that started at `from` sent).
    pub fn clear_wrapping(&mut self, from: u64, to: u64) {
        if from <= to {
            self.clear_range(from, to - from);
        } else {
            self.clear_range(from, self.pages - from);
            self.clear_range(0, to);
        }
    }

    pub fn set(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside {} pages",
            self.pages
        );
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Take `page` out of the set.
    pub fn remove(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Add every page of `other` (a set of the same size).
    pub fn union(&mut self, other: &DirtySet) {
        assert_eq!(self.pages, other.pages, "sets of different sizes");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Coalesced runs `(first_page, count)` of at most `max_run` pages each,
    /// in ascending order: what the sender turns into Pages frames.
    pub fn runs(&self, max_run: u64) -> Runs<impl Fn(usize) -> u64 + '_> {
        Runs::new(|i| self.words[i], self.pages, max_run)
    }

    /// [`DirtySet::runs`] starting at page `from` and wrapping around to
    /// the pages before it, as QEMU's scan goes on where it stopped.
    pub fn runs_from(&self, from: u64, max_run: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let from = from.min(self.pages);
        let tail = self.runs(max_run).filter_map(move |(f, c)| {
            let start = f.max(from);
            (f + c > from).then_some((start, f + c - start))
        });
        let head = self
            .runs(max_run)
            .filter_map(move |(f, c)| (f < from).then_some((f, c.min(from - f))));
        tail.chain(head)
    }
}

/// Where a sender learns which pages were written.
pub trait Tracker: Send {
    /// Add the pages written since the previous harvest to `into` and reset.
    /// `paused`: the guest is stopped and will not run under this tracker
    /// again (the final harvest), so nothing needs re-arming.
    fn harvest(&mut self, into: &mut DirtySet, paused: bool) -> Result<(), DirtyError>;

    /// Whether the guest's vCPUs must be parked around a harvest because the
    /// tracker cannot read and reset in one atomic step.
    fn needs_quiesce(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn set_of(pages: u64, bits: &[u64]) -> DirtySet {
        let mut s = DirtySet::new(pages);
        bits.iter().for_each(|&b| s.set(b));
        s
    }

    #[test]
    fn runs_coalesce_and_split() {
        // An odd page count: the last word is partial.
        let s = set_of(131, &[0, 1, 2, 5, 63, 64, 65, 66, 130]);
        let runs: Vec<_> = s.runs(1024).collect();
        assert_eq!(runs, vec![(0, 3), (5, 1), (63, 4), (130, 1)]);
        let split: Vec<_> = s.runs(2).collect();
        assert_eq!(
            split,
            vec![(0, 2), (2, 1), (5, 1), (63, 2), (65, 2), (130, 1)]
        );
    }

    #[test]
    fn runs_from_wrap_around_and_clearing_follows() {
        let s = set_of(131, &[0, 1, 2, 5, 63, 64, 65, 66, 130]);
        let runs: Vec<_> = s.runs_from(64, 1024).collect();
        assert_eq!(runs, vec![(64, 3), (130, 1), (0, 3), (5, 1), (63, 1)]);
        assert_eq!(
            s.runs_from(0, 1024).collect::<Vec<_>>(),
            s.runs(1024).collect::<Vec<_>>()
        );
        // A pass from page 64 that stopped at page 5 sent 64..131 and 0..5.
        let mut left = s.clone();
        left.clear_wrapping(64, 5);
        assert_eq!(left, set_of(131, &[5, 63]));
        let mut none = s.clone();
        none.clear_wrapping(64, 64);
        assert_eq!(none, s);
    }

    #[test]
    fn all_covers_exactly_the_pages() {
        let s = DirtySet::all(131);
        assert_eq!(s.count(), 131);
        assert_eq!(s.runs(1000).collect::<Vec<_>>(), vec![(0, 131)]);
        assert_eq!(s.words[2], 0b111);
        assert!(!s.contains(131));
    }

    #[test]
    fn set_range_matches_single_sets() {
        for (first, count) in [
            (0, 0),
            (0, 1),
            (3, 61),
            (3, 62),
            (63, 2),
            (64, 64),
            (5, 126),
            (0, 131),
        ] {
            let mut a = DirtySet::new(131);
            a.set_range(first, count);
            let b = set_of(131, &(first..first + count).collect::<Vec<_>>());
            assert_eq!(a, b, "range {first}+{count}");
        }
    }

    #[test]
    fn tracker_names_round_trip() {
        for k in TrackerKind::ALL {
            assert_eq!(k.to_string().parse::<TrackerKind>(), Ok(k));
        }
        let e = "pml".parse::<TrackerKind>().unwrap_err().to_string();
        assert!(e.contains("uffd-wp, bitmap, mprotect, soft-dirty"), "{e}");
    }
}
