//! The `bitmap` tracker: the guest marks a bit per page in a
//! [`SharedBitmap`] (an array of `AtomicU64` in a memfd both processes map),
//! like KVM's dirty log kept in software. The two races of that scheme and how
//! livemig closes them:
//! - *a harvest between mark and write* would reset the bit before the new
//!   bytes land, so the guest marks **after** writing: a harvest before the
//!   mark sends old or torn bytes, and the mark that follows sends the page
//!   again in the next round;
//! - *a pause between write and mark* would leave a written page unmarked, so
//!   the guest is paused only at safe points, between complete write-then-mark
//!   operations ([`crate::guest::control`]), and only then stopped with SIGSTOP.
//!
//! The `mprotect` tracker ([`super::mprotect`]) reuses the same bitmap,
//! marked by the guest's fault handler instead of its vCPUs.

use std::ops::Deref;
use std::sync::atomic::AtomicU64;

use super::{DirtyError, DirtySet, Tracker};
use crate::guest::memory::{MemoryError, SharedRegion};
use crate::util::bitmap::{words_for, AtomicBitmap};
use crate::util::page::PageSize;

/// The words of a bitmap in a shared mapping.
pub struct MappedWords {
    region: SharedRegion,
    words: usize,
}

impl Deref for MappedWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: the region is page aligned and holds at least `words`
        // words (checked at construction), lives as long as `self`, and any
        // bit pattern is a valid AtomicU64; the other process only touches
        // it atomically too.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().cast::<AtomicU64>(), self.words) }
    }
}

/// A bitmap in shared memory, marked by the guest and harvested by the sender.
pub struct SharedBitmap {
    bits: AtomicBitmap<MappedWords>,
}

impl SharedBitmap {
    pub fn bytes_for(pages: u64) -> u64 {
        (words_for(pages) as u64 * 8).next_multiple_of(PageSize::host().as_u64())
    }

    pub fn create(pages: u64) -> Result<Self, MemoryError> {
        let region = SharedRegion::create("livemig-dirty-bitmap", Self::bytes_for(pages))?;
        Ok(Self::from_region(region, pages))
    }

    pub fn from_region(region: SharedRegion, pages: u64) -> Self {
        let words = words_for(pages);
        assert!(
            region.len() >= words * 8,
            "the bitmap's region is too small"
        );
        Self {
            bits: AtomicBitmap::over(MappedWords { region, words }, pages),
        }
    }

    pub fn region(&self) -> &SharedRegion {
        &self.bits.storage().region
    }

    /// The bits themselves.
    pub fn bits(&self) -> &AtomicBitmap<MappedWords> {
        &self.bits
    }

    /// Guest side: record a write to `page` (after the write, see module doc).
    #[inline]
    pub fn mark(&self, page: u64) {
        self.bits.mark(page);
    }

    /// Take and reset: add the marked pages to `into`, clearing each word in
    /// one atomic swap so a concurrent mark lands in this harvest or the next.
    pub fn take_into(&self, into: &mut DirtySet) {
        self.bits.take_into(&mut into.words);
    }
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
    fn harvest(&mut self, into: &mut DirtySet, _paused: bool) -> Result<(), DirtyError> {
        self.bitmap.take_into(into);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::set_of;
    use super::*;

    #[test]
    fn take_and_reset() {
        let bm = SharedBitmap::create(200).unwrap();
        for p in [0, 7, 64, 199] {
            bm.mark(p);
        }
        let mut a = DirtySet::new(200);
        bm.take_into(&mut a);
        assert_eq!(a, set_of(200, &[0, 7, 64, 199]));
        assert_eq!(bm.bits().count(), 0);
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

    /// The race a harvest must win: a mark landing on a word while it is
    /// taken. In each period the writer marks every page exactly once while
    /// this thread harvests as fast as it can; once the writer is done, one
    /// last harvest closes the period. Every mark must be in exactly one
    /// harvest of its period: their union is every page, and no page is in
    /// two of them. A take that loads a word and then stores zero loses the
    /// marks landing between the two; one that does not reset repeats them.
    #[test]
    fn concurrent_marks_are_never_lost() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        // Odd: the last word is partial.
        const PAGES: u64 = 1001;
        const PERIODS: u64 = 3000;
        let bm = Arc::new(SharedBitmap::create(PAGES).unwrap());
        // The period the writer may start, and the last one it finished.
        let (start, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let writer = {
            let (bm, start, done) = (bm.clone(), start.clone(), done.clone());
            std::thread::spawn(move || {
                for k in 1..=PERIODS {
                    while start.load(Ordering::Acquire) < k {
                        std::thread::yield_now();
                    }
                    for p in 0..PAGES {
                        bm.mark(p);
                    }
                    done.store(k, Ordering::Release);
                }
            })
        };
        let mut harvest = DirtySet::new(PAGES);
        for k in 1..=PERIODS {
            let (mut union, mut harvested) = (DirtySet::new(PAGES), 0);
            start.store(k, Ordering::Release);
            loop {
                let last = done.load(Ordering::Acquire) == k;
                bm.take_into(&mut harvest);
                harvested += harvest.count();
                union.union(&harvest);
                harvest.clear();
                if last {
                    break;
                }
            }
            let lost: Vec<u64> = (0..PAGES).filter(|&p| !union.contains(p)).collect();
            assert!(lost.is_empty(), "period {k}: marks of pages {lost:?} lost");
            assert_eq!(harvested, PAGES, "period {k}: a page in two harvests");
        }
        writer.join().unwrap();
    }
}
