//! A `PAGEMAP_SCAN` harvest split over threads: each walks a disjoint range
//! of the guest's page tables (whole page-table pages, so no two threads
//! take the same page-table lock), and the caller merges their runs.
//!
//! The walk reads every page-table entry of guest memory, so its cost
//! grows with memory (0.2 ms per GiB of CPU while the page tables fit in
//! the cache, 0.4 ms beyond). Threads divide the wall time of the walk,
//! not its CPU time: worth it only where a core is free. On the loaded
//! 2-core machine this was built on, two threads made every harvest
//! slower (`cargo bench --bench harvest`; docs/performance.md), so the
//! tracker walks on one thread unless told otherwise
//! ([`super::pagemap::UffdWpTracker::with_parts`]).

use super::pagemap::{PageRegion, Pagemap};
use super::{DirtyError, DirtySet};

/// Pages of one page-table page (512 entries of 8 bytes): the unit a range
/// is cut in.
const TABLE_PAGES: u64 = 512;

/// The `i`th of `parts` ranges of `pages` pages, cut at page-table pages.
pub fn range(pages: u64, parts: usize, i: usize) -> (u64, u64) {
    let tables = pages.div_ceil(TABLE_PAGES);
    let (parts, i) = (parts as u64, i as u64);
    let cut = |k: u64| (tables * k / parts * TABLE_PAGES).min(pages);
    (cut(i), cut(i + 1))
}

/// Harvest `pm` into `into` over `bufs.len()` ranges, the first on this
/// thread and each other on a thread of its own; `protect` as in
/// [`Pagemap::scan_written`]. `bufs` and `runs` are scratch kept across
/// harvests (one per part).
pub fn take_written(
    pm: &Pagemap,
    into: &mut DirtySet,
    protect: bool,
    bufs: &mut [Vec<PageRegion>],
    runs: &mut [Vec<(u64, u64)>],
) -> Result<(), DirtyError> {
    let parts = bufs.len();
    assert_eq!(parts, runs.len(), "one run list per part");
    let pages = pm.pages();
    let (first_buf, other_bufs) = bufs.split_first_mut().expect("at least one part");
    if parts == 1 {
        return pm.scan_written(0, pages, protect, first_buf, |f, c| into.set_range(f, c));
    }
    std::thread::scope(|s| -> Result<(), DirtyError> {
        let helpers: Vec<_> = other_bufs
            .iter_mut()
            .zip(runs.iter_mut())
            .enumerate()
            .map(|(k, (buf, found))| {
                let (from, to) = range(pages, parts, k + 1);
                s.spawn(move || {
                    found.clear();
                    pm.scan_written(from, to, protect, buf, |f, c| found.push((f, c)))
                })
            })
            .collect();
        let (from, to) = range(pages, parts, 0);
        let mine = pm.scan_written(from, to, protect, first_buf, |f, c| into.set_range(f, c));
        // Join every helper before reporting any failure.
        let theirs: Vec<_> = helpers
            .into_iter()
            .map(|h| h.join().expect("a scan thread panicked"))
            .collect();
        mine?;
        theirs.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    })?;
    for found in runs.iter().take(parts - 1) {
        for &(f, c) in found {
            into.set_range(f, c);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_pages_once_cut_at_tables() {
        for pages in [1, 511, 512, 513, 4096, 65536 * 3 + 7] {
            for parts in 1..=5 {
                let mut at = 0;
                for i in 0..parts {
                    let (from, to) = range(pages, parts, i);
                    assert_eq!(from, at, "{pages} pages, part {i} of {parts}");
                    assert!(from <= to);
                    assert!(from.is_multiple_of(TABLE_PAGES) || from == pages);
                    at = to;
                }
                assert_eq!(at, pages, "{pages} pages in {parts} parts");
            }
        }
    }

    /// Split walks find exactly the pages one walk finds, protected or not.
    #[test]
    fn a_split_harvest_finds_what_one_walk_finds() {
        use crate::guest::memory::SharedRegion;
        use crate::guest::uffd::{Uffd, WP_ASYNC_FEATURES};
        use crate::util::page::PageSize;
        if let Err(e) = super::super::TrackerKind::UffdWp.check_kernel() {
            return crate::util::skip::cannot_run(e);
        }
        let ps = PageSize::host();
        // Not a whole number of page tables: the last range is short.
        let pages = 5 * TABLE_PAGES + 77;
        let region = SharedRegion::create("test", ps.bytes(pages)).unwrap();
        let uffd = Uffd::open(WP_ASYNC_FEATURES).unwrap();
        uffd.register_wp(region.as_ptr(), ps.bytes(pages)).unwrap();
        let pm = Pagemap::open(0, region.as_ptr() as u64, pages, ps).unwrap();
        // SAFETY: a byte inside the region (p < pages).
        let write = |p: u64| unsafe { region.as_ptr().add(ps.bytes(p) as usize).write_volatile(1) };
        (0..pages).for_each(write);
        let scratch = |n: usize| (vec![Vec::new(); n], vec![Vec::new(); n]);
        let (mut bufs, mut runs) = scratch(1);
        take_written(&pm, &mut DirtySet::new(pages), true, &mut bufs, &mut runs).unwrap();
        for (round, parts) in [(0u64, 1usize), (1, 2), (2, 3), (3, 4)] {
            let written: Vec<u64> = (0..pages).filter(|p| (p * 13 + round) % 7 == 0).collect();
            written.iter().for_each(|&p| write(p));
            let mut want = DirtySet::new(pages);
            written.iter().for_each(|&p| want.set(p));
            // Unprotected first (the final harvest's walk), then protected.
            for protect in [false, true] {
                let (mut bufs, mut runs) = scratch(parts);
                let mut got = DirtySet::new(pages);
                take_written(&pm, &mut got, protect, &mut bufs, &mut runs).unwrap();
                assert_eq!(got, want, "{parts} parts, protect {protect}");
            }
            let mut none = DirtySet::new(pages);
            take_written(&pm, &mut none, true, &mut bufs, &mut runs).unwrap();
            assert_eq!(none.count(), 0, "protected again after {parts} parts");
        }
    }
}
