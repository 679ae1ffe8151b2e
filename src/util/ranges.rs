//! Work over every page of a big region, split into contiguous ranges on
//! one thread per core (preparing guest memory: the kernel's allocation,
//! zeroing and mapping of each page is independent of every other's).

/// Ranges smaller than this are not worth a thread of their own.
const MIN_RANGE_BYTES: u64 = 64 << 20;

/// How many threads work over `bytes`: one per core, fewer when the ranges
/// would be small.
pub fn workers(bytes: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_size = usize::try_from(bytes / MIN_RANGE_BYTES).unwrap_or(usize::MAX);
    cores.min(by_size).max(1)
}

/// Pages `0..pages` cut into at most `n` contiguous (first, count) ranges,
/// none empty.
pub fn split(pages: u64, n: usize) -> Vec<(u64, u64)> {
    let n = (n as u64).clamp(1, pages.max(1));
    (0..n)
        .map(|i| (pages * i / n, pages * (i + 1) / n - pages * i / n))
        .filter(|&(_, count)| count > 0)
        .collect()
}

/// Run `f(first, count)` over `pages` pages (`bytes` bytes) split by
/// [`workers`], each range on its own thread (the first on this one); the
/// first error wins.
pub fn for_ranges<E, F>(pages: u64, bytes: u64, f: F) -> Result<(), E>
where
    E: Send,
    F: Fn(u64, u64) -> Result<(), E> + Sync,
{
    let ranges = split(pages, workers(bytes));
    let Some((&(first, count), rest)) = ranges.split_first() else {
        return Ok(());
    };
    std::thread::scope(|s| {
        let others: Vec<_> = rest
            .iter()
            .map(|&(a, n)| {
                let f = &f;
                s.spawn(move || f(a, n))
            })
            .collect();
        let mine = f(first, count);
        others
            .into_iter()
            .map(|h| h.join().expect("a range's thread panicked"))
            .fold(mine, Result::and)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_page_once() {
        for (pages, n) in [(10, 3), (1, 4), (7, 1), (1 << 20, 2), (3, 3), (0, 2)] {
            let r = split(pages, n);
            assert!(r.len() <= n);
            let mut next = 0;
            for (first, count) in r {
                assert_eq!(first, next);
                assert!(count > 0);
                next = first + count;
            }
            assert_eq!(next, pages);
        }
    }

    #[test]
    fn workers_are_bounded_by_cores_and_size() {
        assert_eq!(workers(4096), 1);
        assert!(workers(64 << 30) >= 1);
        assert!(workers(128 << 20) <= 2);
    }

    #[test]
    fn every_range_runs_and_an_error_comes_back() {
        let seen = std::sync::Mutex::new(Vec::new());
        for_ranges::<(), _>(1 << 20, 1 << 40, |a, n| {
            seen.lock().unwrap().push((a, n));
            Ok(())
        })
        .unwrap();
        let total: u64 = seen.into_inner().unwrap().iter().map(|r| r.1).sum();
        assert_eq!(total, 1 << 20);
        let e = for_ranges(
            1 << 20,
            1 << 40,
            |a, _| if a == 0 { Err(a) } else { Ok(()) },
        );
        assert_eq!(e, Err(0));
    }
}
