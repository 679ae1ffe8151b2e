//! A fresh guest's initial memory content, written at memory speed: one
//! thread per core over its own range of pages ([`crate::util::ranges`]),
//! each range populated in one call before it is written, and random words
//! copied from a template page rather than computed word by word.

use crate::guest::memory::{GuestMemory, MemoryError};
use crate::guest::workload::{fill_word, Content};
use crate::util::ranges::for_ranges;

/// One page's initial content as words: the template (a guest's random
/// words, computed once) XOR a per-page mix, then the page's stamp in
/// word 1. Pages differ from each other and stay incompressible, at the
/// cost of a copy rather than a hash per word.
#[derive(Debug)]
pub struct Stamp {
    seed: u64,
    template: Vec<u64>,
}

impl Stamp {
    pub fn new(seed: u64, content: &Content, mem: &GuestMemory) -> Self {
        let words = content.random_words(mem.page_size());
        Self {
            seed,
            template: (0..words).map(|k| fill_word(seed, k)).collect(),
        }
    }

    /// The value of word 1 of a non-zero page: distinct per page, never 0.
    pub fn mark(&self, page: u64) -> u64 {
        page ^ self.seed | 1
    }

    /// Write page `page`'s initial content.
    ///
    /// # Safety
    /// Nobody else may read or write the page meanwhile.
    pub unsafe fn write(&self, mem: &GuestMemory, page: u64) {
        let (ptr, _) = mem.pages_ptr(page, 1);
        let ptr = ptr.cast::<u64>();
        let mix = fill_word(self.seed ^ page, u64::MAX);
        // SAFETY: the template has at most page_size / 8 words (random_words),
        // so every store is inside the page, aligned; exclusivity per the
        // caller's contract.
        let words = unsafe { std::slice::from_raw_parts_mut(ptr, self.template.len().max(2)) };
        for (w, t) in words.iter_mut().zip(&self.template) {
            *w = t ^ mix;
        }
        words[1] = self.mark(page);
    }
}

/// Give a fresh guest's pages their initial content (see [`Content`]):
/// all-zero pages stay untouched, every other page gets [`Stamp::write`].
/// When no page starts zero, each thread first populates its whole range
/// (one call rather than a fault per page).
pub fn stamp(mem: &GuestMemory, seed: u64, content: &Content) -> Result<(), MemoryError> {
    let stamp = Stamp::new(seed, content, mem);
    for_ranges(mem.page_count(), mem.len(), |first, count| {
        if content.zero == 0.0 {
            mem.populate_write(first, count)?;
        }
        for page in first..first + count {
            if !content.starts_zero(seed, page) {
                // SAFETY: the guest's vCPUs do not run yet and each page
                // belongs to one range, so this thread is its only user.
                unsafe { stamp.write(mem, page) };
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::page::PageSize;

    #[test]
    fn stamped_pages_are_distinct_and_zero_pages_untouched() {
        let mem = GuestMemory::create(1 << 20, PageSize::MIN).unwrap();
        mem.prealloc().unwrap();
        let content = Content {
            zero: 0.3,
            random: 0.5,
            write_bytes: 8,
            cache: None,
        };
        stamp(&mem, 7, &content).unwrap();
        let mut digests = std::collections::HashSet::new();
        for p in 0..mem.page_count() {
            // SAFETY: nobody else uses this memory.
            let bytes = unsafe { mem.pages(p, 1) };
            if content.starts_zero(7, p) {
                assert!(bytes.iter().all(|&b| b == 0), "page {p}");
                continue;
            }
            assert_eq!(bytes[8..16], (p ^ 7 | 1).to_ne_bytes());
            // Half the page random, the rest zero.
            assert!(bytes[2048..].iter().all(|&b| b == 0));
            assert!(bytes[16..2048].iter().filter(|&&b| b == 0).count() < 100);
            assert!(digests.insert(crate::guest::memory::page_digest(bytes)));
        }
        assert!(digests.len() > 100);
    }
}
