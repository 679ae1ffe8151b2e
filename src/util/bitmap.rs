//! Pages as words of atomic bits (rust-vmm's `AtomicBitmap`): marking a page
//! is one `fetch_or`, taking a word is one `swap(0)`, so a mark racing a take
//! lands in this take or in the next, never in neither and never in both.
//!
//! The words are owned (a `Vec`) or sit over memory another process maps
//! too (any `Deref<Target = [AtomicU64]>`, e.g. the dirty bitmap in a memfd,
//! or a borrowed slice in a signal handler). Set bits read out as coalesced
//! runs of pages ([`Runs`]), the same iterator the single-threaded
//! `DirtySet` uses.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

/// A bit per page, shared between threads or processes.
pub struct AtomicBitmap<W = Vec<AtomicU64>> {
    words: W,
    pages: u64,
}

impl AtomicBitmap {
    /// `pages` clear bits, owned.
    pub fn new(pages: u64) -> Self {
        let words = (0..words_for(pages)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }
}

impl<W: Deref<Target = [AtomicU64]>> AtomicBitmap<W> {
    /// A bitmap of `pages` over `words`, which must hold a bit per page.
    pub fn over(words: W, pages: u64) -> Self {
        assert!(
            words.len() >= words_for(pages),
            "{} words cannot hold {pages} pages",
            words.len()
        );
        Self { words, pages }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// What the words sit in (a mapping's owner, say).
    pub fn storage(&self) -> &W {
        &self.words
    }

    fn word(&self, page: u64) -> (&AtomicU64, u64) {
        debug_assert!(page < self.pages, "page {page} of {}", self.pages);
        (&self.words[(page / 64) as usize], 1 << (page % 64))
    }

    /// Set `page`'s bit; true if it was clear.
    #[inline]
    pub fn mark(&self, page: u64) -> bool {
        let (w, bit) = self.word(page);
        w.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Set `count` bits from `first`, a word at a time. Allocates nothing,
    /// so a signal handler may call it.
    pub fn mark_range(&self, first: u64, count: u64) {
        assert!(
            first.saturating_add(count) <= self.pages,
            "pages {first}+{count}"
        );
        for (i, mask) in word_masks(first, count) {
            self.words[i].fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Clear `page`'s bit; true if it was set.
    pub fn clear(&self, page: u64) -> bool {
        let (w, bit) = self.word(page);
        w.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    pub fn is_set(&self, page: u64) -> bool {
        let (w, bit) = self.word(page);
        w.load(Ordering::Acquire) & bit != 0
    }

    /// Set bits now (a snapshot if others mark meanwhile).
    pub fn count(&self) -> u64 {
        let n = words_for(self.pages);
        let tail = match self.pages % 64 {
            0 => u64::MAX,
            r => (1 << r) - 1,
        };
        self.words[..n]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = w.load(Ordering::Acquire);
                u64::from(if i + 1 == n { w & tail } else { w }.count_ones())
            })
            .sum()
    }

    /// Take and reset word `i` in one atomic step.
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        self.words[i].swap(0, Ordering::AcqRel)
    }

    /// Take and reset every word, or-ing it into `into` (a bit per page,
    /// like this bitmap): a concurrent mark lands in this take or the next.
    pub fn take_into(&self, into: &mut [u64]) {
        for (i, out) in into.iter_mut().enumerate().take(words_for(self.pages)) {
            // A load first: most words of a large guest are clear, and a
            // read keeps the cache line shared with the marking side.
            if self.words[i].load(Ordering::Relaxed) != 0 {
                *out |= self.take_word(i);
            }
        }
    }

    /// Coalesced runs `(first_page, count)` of set bits, at most `max_run`
    /// pages each, read without resetting.
    pub fn runs(&self, max_run: u64) -> Runs<impl Fn(usize) -> u64 + '_> {
        Runs::new(
            |i| self.words[i].load(Ordering::Acquire),
            self.pages,
            max_run,
        )
    }
}

/// Words needed for a bit per page.
pub fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).expect("bitmap fits in memory")
}

/// The words and masks covering bits `first..first+count`, in order.
pub fn word_masks(first: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first.checked_add(count).expect("page range overflows");
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let bit = p % 64;
        let n = (64 - bit).min(end - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let i = (p / 64) as usize;
        p += n;
        Some((i, mask))
    })
}

/// Runs of set bits in ascending order, over any words (`word(i)` reads word
/// `i`), each at most `max_run` pages: what a sender turns into frames.
pub struct Runs<F> {
    word: F,
    pages: u64,
    next: u64,
    max_run: u64,
}

impl<F: Fn(usize) -> u64> Runs<F> {
    pub fn new(word: F, pages: u64, max_run: u64) -> Self {
        assert!(max_run > 0);
        Self {
            word,
            pages,
            next: 0,
            max_run,
        }
    }

    fn words(&self) -> usize {
        words_for(self.pages)
    }

    fn next_set_from(&self, from: u64) -> Option<u64> {
        let mut wi = (from / 64) as usize;
        if wi >= self.words() {
            return None;
        }
        let mut w = (self.word)(wi) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let p = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            wi += 1;
            if wi >= self.words() {
                return None;
            }
            w = (self.word)(wi);
        }
    }

    /// The first clear page at or after `from`, or `limit` (or the end) if
    /// every page before it is set: runs are capped, so never scan further.
    fn next_clear_from(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.pages);
        let mut wi = (from / 64) as usize;
        let mut w = !(self.word)(wi) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(limit);
            }
            wi += 1;
            if wi as u64 * 64 >= limit {
                return limit;
            }
            w = !(self.word)(wi);
        }
    }
}

impl<F: Fn(usize) -> u64> Iterator for Runs<F> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.next_set_from(self.next)?;
        let end = self.next_clear_from(first, first.saturating_add(self.max_run));
        self.next = end;
        Some((first, end - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: &AtomicBitmap, i: usize) -> u64 {
        b.words[i].load(Ordering::Relaxed)
    }

    #[test]
    fn marks_and_clears_bits() {
        // An odd page count: the last of three words is partial.
        let b = AtomicBitmap::new(131);
        assert_eq!(b.words.len(), 3);
        assert!(b.mark(0) && b.mark(3) && b.mark(64) && b.mark(130));
        assert!(!b.mark(3), "already set");
        assert_eq!(word(&b, 0), 0b1001);
        assert_eq!(word(&b, 1), 0b1);
        assert_eq!(word(&b, 2), 0b100);
        assert!(b.is_set(130) && !b.is_set(129));
        assert!(b.clear(3) && !b.clear(3));
        assert_eq!(word(&b, 0), 0b1);
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn mark_range_sets_whole_and_partial_words() {
        let b = AtomicBitmap::new(131);
        b.mark_range(62, 67);
        assert_eq!(word(&b, 0), 0b11 << 62);
        assert_eq!(word(&b, 1), u64::MAX);
        assert_eq!(word(&b, 2), 0b1);
        b.mark_range(130, 1);
        assert_eq!(word(&b, 2), 0b101);
        assert_eq!(b.count(), 68);
    }

    #[test]
    fn take_resets_and_ors_into() {
        let b = AtomicBitmap::new(131);
        b.mark_range(1, 2);
        b.mark(129);
        let mut into = [0b1000_0000u64, 0, 0b1];
        b.take_into(&mut into);
        assert_eq!(into, [0b1000_0110, 0, 0b11]);
        assert_eq!(b.count(), 0);
        b.mark(65);
        assert_eq!(b.take_word(1), 0b10);
        assert_eq!(b.take_word(1), 0);
    }

    #[test]
    fn runs_coalesce_across_words_and_split() {
        let b = AtomicBitmap::new(131);
        for p in [0, 1, 2, 5, 63, 64, 65, 66, 130] {
            b.mark(p);
        }
        let runs: Vec<_> = b.runs(1024).collect();
        assert_eq!(runs, vec![(0, 3), (5, 1), (63, 4), (130, 1)]);
        let split: Vec<_> = b.runs(2).collect();
        assert_eq!(
            split,
            vec![(0, 2), (2, 1), (5, 1), (63, 2), (65, 2), (130, 1)]
        );
        // Reading runs resets nothing.
        assert_eq!(b.count(), 9);
    }

    #[test]
    fn runs_ignore_bits_past_the_last_page() {
        let words: Vec<AtomicU64> = vec![AtomicU64::new(0), AtomicU64::new(u64::MAX)];
        let b = AtomicBitmap::over(&words[..], 67);
        assert_eq!(b.runs(100).collect::<Vec<_>>(), vec![(64, 3)]);
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn over_a_borrowed_slice_marks_the_same_words() {
        let owned = AtomicBitmap::new(131);
        let view = AtomicBitmap::over(&owned.words[..], 131);
        view.mark_range(127, 4);
        assert_eq!(word(&owned, 1), 0b1 << 63);
        assert_eq!(word(&owned, 2), 0b111);
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    fn over_too_few_words_is_refused() {
        let words = [AtomicU64::new(0)];
        AtomicBitmap::over(&words[..], 65);
    }
}
