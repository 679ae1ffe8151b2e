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

use std::sync::atomic::{AtomicU64, Ordering};

use super::{DirtyError, DirtySet, Tracker};
use crate::guest::memory::{MemoryError, SharedRegion};

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
}
