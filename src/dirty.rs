//! Dirty tracking: which pages were written since the last harvest.
//!
//! Every tracker implements [`Tracker`]: `harvest` adds the pages written
//! since the previous harvest to a [`DirtySet`] and resets the tracker's own
//! record atomically, so no write falls between two harvests.
//!
//! The first backend is `bitmap`: the guest marks a bit per page in a
//! [`SharedBitmap`] (an array of `AtomicU64` in a memfd both processes map),
//! like KVM's dirty log kept in software. The two races of that scheme and how
//! livemig closes them:
//! - *a harvest between mark and write* would reset the bit before the new
//!   bytes land, so the guest marks **after** writing: a harvest before the
//!   mark sends old or torn bytes, and the mark that follows sends the page
//!   again in the next round;
//! - *a pause between write and mark* would leave a written page unmarked, so
//!   the guest is paused only at safe points, between complete write-then-mark
//!   operations ([`crate::control`]), and only then stopped with SIGSTOP.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::{MemoryError, SharedRegion};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("unknown --tracker \"{0}\" (available: bitmap)")]
    UnknownTracker(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Trackers livemig knows (`--tracker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    Bitmap,
}

impl TrackerKind {
    pub fn parse(s: &str) -> Result<Self, DirtyError> {
        match s {
            "bitmap" => Ok(Self::Bitmap),
            other => Err(DirtyError::UnknownTracker(other.into())),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
        }
    }
}

/// A round's set of pages, owned by one thread: words of bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySet {
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
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

    pub fn set(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside {} pages",
            self.pages
        );
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Coalesced runs `(first_page, count)` of at most `max_run` pages each,
    /// in ascending order: what the sender turns into Pages frames.
    pub fn runs(&self, max_run: u64) -> Runs<'_> {
        assert!(max_run > 0);
        Runs {
            set: self,
            next: 0,
            max_run,
        }
    }

    fn next_set_from(&self, from: u64) -> Option<u64> {
        let mut wi = (from / 64) as usize;
        let mut w = *self.words.get(wi)? & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
            }
            wi += 1;
            w = *self.words.get(wi)?;
        }
    }

    /// The first clear page at or after `from`, or `limit` (or the end) if
    /// every page before it is set: runs are capped, so never scan further.
    fn next_clear_from(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.pages);
        let mut wi = (from / 64) as usize;
        let mut w = !self.words[wi] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(limit);
            }
            wi += 1;
            if wi as u64 * 64 >= limit {
                return limit;
            }
            w = !self.words[wi];
        }
    }
}

/// Iterator of [`DirtySet::runs`].
pub struct Runs<'a> {
    set: &'a DirtySet,
    next: u64,
    max_run: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.set.next_set_from(self.next)?;
        let end = self.set.next_clear_from(first, first + self.max_run);
        self.next = end;
        Some((first, end - first))
    }
}

/// A bitmap in shared memory, marked by the guest and harvested by the sender.
pub struct SharedBitmap {
    region: SharedRegion,
    pages: u64,
}

impl SharedBitmap {
    pub fn bytes_for(pages: u64) -> u64 {
        (pages.div_ceil(64) * 8).next_multiple_of(4096)
    }

    pub fn create(pages: u64) -> Result<Self, MemoryError> {
        let region = SharedRegion::create("livemig-dirty-bitmap", Self::bytes_for(pages))?;
        Ok(Self { region, pages })
    }

    pub fn from_region(region: SharedRegion, pages: u64) -> Self {
        assert!(region.len() as u64 >= pages.div_ceil(64) * 8);
        Self { region, pages }
    }

    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the region is page aligned, holds at least pages/64 words
        // (checked at construction), lives as long as `self`, and any bit
        // pattern is a valid AtomicU64.
        unsafe {
            std::slice::from_raw_parts(
                self.region.as_ptr() as *const AtomicU64,
                self.pages.div_ceil(64) as usize,
            )
        }
    }

    /// Guest side: record a write to `page` (after the write, see module doc).
    #[inline]
    pub fn mark(&self, page: u64) {
        self.words()[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Take and reset: add the marked pages to `into`, clearing each word in
    /// one atomic swap so a concurrent mark lands in this harvest or the next.
    pub fn take_into(&self, into: &mut DirtySet) {
        for (w, out) in self.words().iter().zip(into.words.iter_mut()) {
            if w.load(Ordering::Relaxed) != 0 {
                *out |= w.swap(0, Ordering::Acquire);
            }
        }
    }
}

/// Where a sender learns which pages were written.
pub trait Tracker: Send {
    /// Add the pages written since the previous harvest to `into` and reset.
    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), DirtyError>;
}

/// The `bitmap` tracker: reads the guest's own marks.
pub struct BitmapTracker {
    bitmap: SharedBitmap,
}

impl BitmapTracker {
    pub fn new(bitmap: SharedBitmap) -> Self {
        Self { bitmap }
    }
}

impl Tracker for BitmapTracker {
    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), DirtyError> {
        self.bitmap.take_into(into);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(pages: u64, bits: &[u64]) -> DirtySet {
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
    fn all_covers_exactly_the_pages() {
        let s = DirtySet::all(131);
        assert_eq!(s.count(), 131);
        assert_eq!(s.runs(1000).collect::<Vec<_>>(), vec![(0, 131)]);
        assert_eq!(s.words[2], 0b111);
        assert!(!s.contains(131));
    }

    #[test]
    fn take_and_reset() {
        let bm = SharedBitmap::create(200).unwrap();
        for p in [0, 7, 64, 199] {
            bm.mark(p);
        }
        let mut a = DirtySet::new(200);
        bm.take_into(&mut a);
        assert_eq!(a, set_of(200, &[0, 7, 64, 199]));
        assert_eq!(bm.words()[0].load(Ordering::Relaxed), 0);
        // A second harvest sees only what was marked since the first.
        bm.mark(8);
        let mut b = DirtySet::new(200);
        bm.take_into(&mut b);
        assert_eq!(b, set_of(200, &[8]));
        // Harvesting into a non-empty set keeps what it had (stop-and-copy).
        bm.mark(1);
        bm.take_into(&mut b);
        assert_eq!(b, set_of(200, &[1, 8]));
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let bm = std::sync::Arc::new(SharedBitmap::create(4096).unwrap());
        let writer = {
            let bm = bm.clone();
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    bm.mark(i % 4096);
                }
            })
        };
        let mut total = DirtySet::new(4096);
        while !writer.is_finished() {
            bm.take_into(&mut total);
        }
        writer.join().unwrap();
        bm.take_into(&mut total);
        assert_eq!(total.count(), 4096);
    }

    #[test]
    fn unknown_tracker_is_named() {
        let e = TrackerKind::parse("pml").unwrap_err().to_string();
        assert!(e.contains("\"pml\"") && e.contains("bitmap"), "{e}");
    }
}
