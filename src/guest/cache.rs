//! A guest with page cache: a share of its memory holds copies of blocks of
//! a backing file (its "disk"), read in when the guest starts, as a web
//! server's or a database's page cache holds its data files.
//!
//! Workload content keys `cache=F` (share of pages, 0-1) and
//! `layout=seq|scatter` choose which pages and which blocks: `seq` puts the
//! cache in the last F of memory, holding blocks 0, 1, 2, ... in order (one
//! file read sequentially); `scatter` makes each page a cache page with
//! probability F and gives the cache pages a seeded permutation of the
//! blocks (a database's pages, read in any order). Both are deterministic in
//! the guest's seed.
//!
//! The guest publishes its page -> block mapping ([`CacheMap`]) into a
//! memfd its owner hands it, as Akiyama et al.'s guest kernel module tells
//! the hypervisor: the owner reads it once the guest runs. A page the guest
//! writes after the fill no longer matches its block; the dirty tracker
//! tells which.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::guest::memory::GuestMemory;
use crate::util::page::PageSize;

/// Blocks the fill reads with one `pread` (4 MiB of 4 KiB pages).
const FILL_BATCH: u64 = 1024;
/// Salt of the scatter layout's random choices (apart from the workload's).
const SCATTER_SALT: u64 = 0x7e1e_9047_cac4_e5a1;

/// Errors reading a guest's disk or its published mapping.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot open the backing file {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the backing file {} has {have} blocks of {block} bytes; the page cache needs {need}", .path.display())]
    Short {
        path: PathBuf,
        have: u64,
        need: u64,
        block: u64,
    },
    #[error("cannot read the backing file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the published page-cache mapping is damaged: {0}")]
    Damaged(String),
    #[error(
        "workload \"{0}\" has a page cache (cache=F): give its backing file with --teleport FILE"
    )]
    NoDisk(String),
    #[error("cannot publish the page-cache mapping")]
    Publish(#[source] std::io::Error),
}

/// A `layout=` that is neither `seq` nor `scatter`.
#[derive(Debug, thiserror::Error)]
#[error("layout=\"{0}\" is not seq or scatter")]
pub struct BadLayout(pub String);

/// How cache pages and blocks are laid out (`layout=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    Seq,
    Scatter,
}

impl CacheLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Seq => "seq",
            Self::Scatter => "scatter",
        }
    }
}

/// The page cache a workload asks for (`cache=F,layout=...`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cache {
    /// Share of guest pages that hold a block.
    pub share: f64,
    pub layout: CacheLayout,
}

impl Cache {
    /// `cache=F` and `layout=`: a layout alone is no cache.
    pub(crate) fn from_keys(
        share: Option<f64>,
        layout: Option<&str>,
    ) -> Result<Option<Cache>, BadLayout> {
        let layout = match layout {
            None | Some("seq") => CacheLayout::Seq,
            Some("scatter") => CacheLayout::Scatter,
            Some(other) => return Err(BadLayout(other.into())),
        };
        Ok(share
            .filter(|&s| s > 0.0)
            .map(|share| Cache { share, layout }))
    }
}

/// Pages `first_page..first_page+count` hold blocks `first_block..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRun {
    pub first_page: u64,
    pub first_block: u64,
    pub count: u64,
}

/// A guest's page -> block mapping, in page order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheMap {
    runs: Vec<MapRun>,
}

fn rand(seed: u64, n: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&n.to_le_bytes(), seed ^ SCATTER_SALT)
}

impl CacheMap {
    /// The mapping of a guest seeded with `seed` over `page_count` pages.
    pub fn compute(cache: &Cache, seed: u64, page_count: u64) -> CacheMap {
        let pages: Vec<u64> = match cache.layout {
            CacheLayout::Seq => {
                // f64 -> u64: a share of a page count, far below 2^53.
                let n = ((cache.share * page_count as f64).round() as u64).min(page_count);
                (page_count - n..page_count).collect()
            }
            CacheLayout::Scatter => (0..page_count)
                .filter(|&p| ((rand(seed, p) >> 11) as f64 / (1u64 << 53) as f64) < cache.share)
                .collect(),
        };
        let mut blocks: Vec<u64> = (0..pages.len() as u64).collect();
        if cache.layout == CacheLayout::Scatter {
            // Fisher-Yates under the guest's seed.
            for i in (1..blocks.len()).rev() {
                let j = (rand(seed.rotate_left(17), i as u64) % (i as u64 + 1)) as usize;
                blocks.swap(i, j);
            }
        }
        Self::from_pairs(pages.into_iter().zip(blocks))
    }

    /// Coalesce (page, block) pairs given in page order into runs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, u64)>) -> CacheMap {
        let mut runs: Vec<MapRun> = Vec::new();
        for (page, block) in pairs {
            match runs.last_mut() {
                Some(r) if r.first_page + r.count == page && r.first_block + r.count == block => {
                    r.count += 1
                }
                _ => runs.push(MapRun {
                    first_page: page,
                    first_block: block,
                    count: 1,
                }),
            }
        }
        CacheMap { runs }
    }

    pub fn runs(&self) -> &[MapRun] {
        &self.runs
    }

    /// Every (page, block) pair, in page order.
    pub fn pairs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (0..r.count).map(move |i| (r.first_page + i, r.first_block + i)))
    }

    /// Cache pages.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// Blocks the backing file must hold: one past the highest mapped.
    pub fn blocks_needed(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.first_block + r.count)
            .max()
            .unwrap_or(0)
    }

    /// `runs: u64`, then per run `first_page, first_block, count` (u64 LE).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 24 * self.runs.len());
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for r in &self.runs {
            for v in [r.first_page, r.first_block, r.count] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// Read back [`CacheMap::to_bytes`], checking it against `page_count`.
    pub fn from_bytes(b: &[u8], page_count: u64) -> Result<CacheMap, CacheError> {
        let word = |i: usize| -> Option<u64> {
            let w = b.get(i * 8..i * 8 + 8)?;
            Some(u64::from_le_bytes(w.try_into().ok()?))
        };
        let damaged = |why: &str| CacheError::Damaged(why.into());
        let n = word(0).ok_or_else(|| damaged("no run count"))?;
        if n > page_count || b.len() as u64 != 8 + 24 * n {
            return Err(damaged("its length does not match its run count"));
        }
        let mut runs = Vec::with_capacity(n as usize);
        let mut next_page = 0;
        for i in 0..n as usize {
            let (first_page, first_block, count) = (
                word(1 + 3 * i).unwrap_or(0),
                word(2 + 3 * i).unwrap_or(0),
                word(3 + 3 * i).unwrap_or(0),
            );
            let end = first_page.checked_add(count).filter(|&e| e <= page_count);
            if count == 0 || first_page < next_page || end.is_none() {
                return Err(damaged("a run is empty, out of order or outside memory"));
            }
            first_block
                .checked_add(count)
                .ok_or_else(|| damaged("a block number overflows"))?;
            next_page = first_page + count;
            runs.push(MapRun {
                first_page,
                first_block,
                count,
            });
        }
        Ok(CacheMap { runs })
    }
}

/// Open `path` and check it holds `blocks` blocks of `block` bytes.
pub fn open_disk(path: &Path, blocks: u64, block: PageSize) -> Result<File, CacheError> {
    let open = |source| CacheError::Open {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(open)?;
    let len = file.metadata().map_err(open)?.len();
    if len / block.as_u64() < blocks {
        return Err(CacheError::Short {
            path: path.into(),
            have: len / block.as_u64(),
            need: blocks,
            block: block.as_u64(),
        });
    }
    Ok(file)
}

/// Read the mapped blocks of `disk` into their pages of `mem` (before any
/// vCPU runs).
pub fn fill(mem: &GuestMemory, map: &CacheMap, disk: &File, path: &Path) -> Result<(), CacheError> {
    let ps = mem.page_size();
    for r in map.runs() {
        let mut done = 0;
        while done < r.count {
            let n = (r.count - done).min(FILL_BATCH);
            // SAFETY: the guest's vCPUs have not started; nothing else
            // touches these pages yet.
            let buf = unsafe { mem.pages_mut(r.first_page + done, n) };
            disk.read_exact_at(buf, ps.bytes(r.first_block + done))
                .map_err(|source| CacheError::Read {
                    path: path.into(),
                    source,
                })?;
            done += n;
        }
    }
    Ok(())
}

/// The guest's side: read the page cache from its disk and publish its
/// mapping into the owner's memfd `map_fd`.
pub fn fill_and_publish(
    mem: &GuestMemory,
    cache: &Cache,
    (seed, spec): (u64, &str),
    disk: Option<&Path>,
    map_fd: Option<RawFd>,
) -> Result<(), CacheError> {
    let (Some(path), Some(fd)) = (disk, map_fd) else {
        return Err(CacheError::NoDisk(spec.into()));
    };
    let map = CacheMap::compute(cache, seed, mem.page_count());
    let file = open_disk(path, map.blocks_needed(), mem.page_size())?;
    fill(mem, &map, &file, path)?;
    // SAFETY: the owner handed this fd to this process for this use.
    let out = unsafe { File::from_raw_fd(fd) };
    publish(&map, &out)
}

/// The memfd a guest publishes its mapping into (the owner's side).
pub fn map_memfd() -> std::io::Result<File> {
    let fd =
        nix::sys::memfd::memfd_create("livemig-cache-map", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    Ok(File::from(fd))
}

/// Write `map` into the owner's memfd (the guest's side of publishing).
pub fn publish(map: &CacheMap, into: &File) -> Result<(), CacheError> {
    into.write_all_at(&map.to_bytes(), 0)
        .map_err(CacheError::Publish)
}

/// Read what the guest published into `from` (the owner's side).
pub fn read_published(from: &File, page_count: u64) -> Result<CacheMap, CacheError> {
    let len = from.metadata().map_err(CacheError::Publish)?.len();
    let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
    from.read_exact_at(&mut b, 0).map_err(CacheError::Publish)?;
    CacheMap::from_bytes(&b, page_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_one_run_at_the_end_of_memory() {
        let c = Cache {
            share: 0.75,
            layout: CacheLayout::Seq,
        };
        let m = CacheMap::compute(&c, 1, 1000);
        assert_eq!(
            m.runs(),
            &[MapRun {
                first_page: 250,
                first_block: 0,
                count: 750
            }]
        );
        assert_eq!((m.pages(), m.blocks_needed()), (750, 750));
    }

    #[test]
    fn scatter_is_a_permutation_of_the_blocks() {
        let c = Cache {
            share: 0.5,
            layout: CacheLayout::Scatter,
        };
        let m = CacheMap::compute(&c, 7, 10_000);
        let n = m.pages();
        assert!((4500..5500).contains(&n), "{n}");
        let mut blocks: Vec<u64> = m.pairs().map(|(_, b)| b).collect();
        blocks.sort_unstable();
        assert_eq!(blocks, (0..n).collect::<Vec<_>>());
        assert_eq!(m.blocks_needed(), n);
        assert!(m.runs().len() as u64 > n / 2, "scattered, not contiguous");
        assert_eq!(CacheMap::compute(&c, 7, 10_000), m, "deterministic");
        assert_ne!(CacheMap::compute(&c, 8, 10_000), m);
    }

    #[test]
    fn the_published_form_reads_back_and_refuses_damage() {
        let c = Cache {
            share: 0.3,
            layout: CacheLayout::Scatter,
        };
        let m = CacheMap::compute(&c, 3, 512);
        let b = m.to_bytes();
        assert_eq!(CacheMap::from_bytes(&b, 512).unwrap(), m);
        assert!(CacheMap::from_bytes(&b[..b.len() - 1], 512).is_err());
        assert!(CacheMap::from_bytes(&b, 100).is_err(), "outside memory");
        let mut swapped = b.clone();
        swapped[8..32].copy_from_slice(&b[32..56]);
        swapped[32..56].copy_from_slice(&b[8..32]);
        assert!(CacheMap::from_bytes(&swapped, 512).is_err(), "out of order");
    }
}
