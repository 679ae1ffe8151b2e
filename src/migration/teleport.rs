//! Page-cache teleportation (Akiyama et al., "Fast Live Migration for
//! Data-intensive VMs by Exploiting Storage Area Network in Datacenter",
//! 2014): a guest's clean page cache holds copies of blocks the destination
//! can read itself from shared storage. The sender gives the destination
//! the page -> block mapping of a share R of those pages and sends the rest
//! of memory over the network; the destination reads the blocks in
//! parallel with the stream, paced by `--storage-rate`.
//!
//! What this module holds, shared by both ends: the share R (`--teleport-share
//! R|auto`) and how `auto` chooses it ([`choose_share`]: both channels
//! finish together), the digest of sampled blocks that tells a different
//! file apart, and the destination's reader with its ordering rule.
//!
//! **Ordering.** Every page the destination was told to read starts
//! *pending* ([`Claims`]). The network path claims every page it is about to
//! write (pending or not); the storage reader writes a page only if it can
//! move it from pending to *storing* first, and the network waits for a
//! page that is being stored to be done before it writes. So a block read
//! from storage never lands over a newer network copy, and a page the guest
//! wrote after its mapping was sent (harvested as dirty, sent by network as
//! usual) supersedes the block whichever arrives first.
//!
//! **Real reads.** The reader opens the file with `O_DIRECT`, so the bytes
//! come from the disk and not from the page cache of this host (which on one
//! machine holds the file since the source guest read it). Where the
//! filesystem refuses `O_DIRECT` (tmpfs), it drops the file's cached pages
//! with `posix_fadvise(POSIX_FADV_DONTNEED)` before each read instead.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::guest::memory::{page_digest, GuestMemory};
use crate::util::page::PageSize;
use crate::wire::datapath::Landed;
use crate::wire::protocol::MapEntry;
use crate::wire::ratelimit::RateLimiter;

/// Blocks sampled for the digest that compares the two ends' files.
pub const DIGEST_SAMPLES: u64 = 64;
/// Blocks read at once (1 MiB of 4 KiB blocks).
const READ_BATCH: u64 = 256;
/// Bytes read to measure the storage's rate when the offer comes.
pub const PROBE_BYTES: u64 = 8 << 20;

/// Errors of the storage channel.
#[derive(Debug, thiserror::Error)]
pub enum TeleportError {
    #[error("\"{0}\" is not a share between 0 and 1, or auto")]
    Share(String),
    #[error("the backing file {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading block {block} of the backing file {}", .path.display())]
    Read {
        path: PathBuf,
        block: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the backing file {} has {have} blocks; the mapping needs {need}", .path.display())]
    Short { path: PathBuf, have: u64, need: u64 },
    #[error("cannot map a buffer for direct reads")]
    Buffer(#[source] std::io::Error),
}

/// The share of clean page cache that goes by storage (`--teleport-share`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Share {
    Fixed(f64),
    /// Chosen from the two channels' measured rates ([`choose_share`]).
    Auto,
}

impl FromStr for Share {
    type Err = TeleportError;
    fn from_str(s: &str) -> Result<Share, TeleportError> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Share::Auto);
        }
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .map(Share::Fixed)
            .ok_or_else(|| TeleportError::Share(s.into()))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Fixed(r) => write!(f, "{r}"),
            Share::Auto => f.write_str("auto"),
        }
    }
}

/// The sender's side: its guest's backing file and the share to teleport.
#[derive(Clone, Debug, PartialEq)]
pub struct TeleportConfig {
    pub file: PathBuf,
    pub share: Share,
    /// The destination's read rate, where this process knows it (`migrate`,
    /// sweeps and predictions); a remote receiver sets its own.
    pub storage_rate: Option<u64>,
}

/// The destination's side: its path to the same data, and the read rate
/// that emulates the storage network (None: as fast as the disk).
#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    pub file: PathBuf,
    pub rate: Option<u64>,
}

/// The share R that makes both channels finish together: the network still
/// has `network_pages` to send besides the cache pages it keeps, storage
/// starts now; `net` and `storage` in bytes/s. R·C/S = (O + (1-R)·C)/N.
pub fn choose_share(net: f64, storage: f64, network_pages: u64, cache_pages: u64) -> f64 {
    if cache_pages == 0 || storage <= 0.0 {
        return 0.0;
    }
    if net <= 0.0 {
        return 1.0;
    }
    let (o, c) = (network_pages as f64, cache_pages as f64);
    (storage * (o + c) / (c * (net + storage))).clamp(0.0, 1.0)
}

/// Open `path` for reads that bypass this host's page cache; the flag
/// says whether `O_DIRECT` took (else fadvise drops cached pages).
pub fn open_direct(path: &Path) -> Result<(File, bool), TeleportError> {
    let open = |source| TeleportError::Open {
        path: path.into(),
        source,
    };
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((File::open(path).map_err(open)?, false))
        }
        Err(e) => Err(open(e)),
    }
}

/// A file opened for uncached reads of whole blocks into an aligned buffer.
pub struct Disk {
    file: File,
    path: PathBuf,
    direct: bool,
    block: PageSize,
    buf: memmap2::MmapMut,
    pub blocks: u64,
}

impl Disk {
    pub fn open(path: &Path, block: PageSize) -> Result<Disk, TeleportError> {
        let (file, direct) = open_direct(path)?;
        let len = file
            .metadata()
            .map_err(|source| TeleportError::Open {
                path: path.into(),
                source,
            })?
            .len();
        let buf = memmap2::MmapMut::map_anon(block.as_usize() * READ_BATCH as usize)
            .map_err(TeleportError::Buffer)?;
        Ok(Disk {
            file,
            path: path.into(),
            direct,
            block,
            buf,
            blocks: len / block.as_u64(),
        })
    }

    /// Refuse a file shorter than `need` blocks.
    pub fn check_len(&self, need: u64) -> Result<(), TeleportError> {
        match self.blocks >= need {
            true => Ok(()),
            false => Err(TeleportError::Short {
                path: self.path.clone(),
                have: self.blocks,
                need,
            }),
        }
    }

    /// Read `count` (at most [`READ_BATCH`]) blocks from `first`.
    fn read(&mut self, first: u64, count: u64) -> Result<&[u8], TeleportError> {
        let len = self.block.bytes(count) as usize;
        let off = self.block.bytes(first);
        if !self.direct {
            // SAFETY: posix_fadvise only advises the kernel about this fd's file.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    off as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
        let buf = &mut self.buf[..len];
        self.file
            .read_exact_at(buf, off)
            .map_err(|source| TeleportError::Read {
                path: self.path.clone(),
                block: first,
                source,
            })?;
        Ok(&self.buf[..len])
    }

    /// The digest of [`DIGEST_SAMPLES`] blocks spread over the first
    /// `blocks` (both ends sample the same ones).
    pub fn sample_digest(&mut self, blocks: u64) -> Result<u64, TeleportError> {
        self.check_len(blocks)?;
        let samples = DIGEST_SAMPLES.min(blocks);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for i in 0..samples {
            let b = i * blocks / samples;
            h.update(&b.to_le_bytes());
            h.update(self.read(b, 1)?);
        }
        Ok(h.digest())
    }

    /// Read rate through `limiter` over a few MiB from the start, in bytes/s.
    pub fn probe_rate(&mut self, limiter: &RateLimiter, blocks: u64) -> Result<u64, TeleportError> {
        let n = (PROBE_BYTES / self.block.as_u64()).min(blocks);
        if n == 0 {
            return Ok(0);
        }
        // Empty the bucket first, so its burst does not flatter the rate.
        limiter.acquire(RateLimiter::initial_burst(limiter.limit()));
        let t = Instant::now();
        let mut b = 0;
        while b < n {
            let count = (n - b).min(READ_BATCH);
            limiter.acquire(self.block.bytes(count));
            self.read(b, count)?;
            b += count;
        }
        // f64 -> u64: a rate in bytes/s.
        Ok((self.block.bytes(n) as f64 / t.elapsed().as_secs_f64().max(1e-6)) as u64)
    }
}

/// Who owns each page at the destination (see the module's ordering rule).
pub struct Claims {
    state: Vec<AtomicU8>,
}

const IDLE: u8 = 0;
const PENDING: u8 = 1;
const STORING: u8 = 2;
const STORED: u8 = 3;
const NETWORK: u8 = 4;

impl Claims {
    pub fn new(pages: u64) -> Claims {
        Claims {
            state: (0..pages).map(|_| AtomicU8::new(IDLE)).collect(),
        }
    }

    fn at(&self, page: u64) -> &AtomicU8 {
        &self.state[page as usize]
    }

    /// Storage is to read this page, unless it has already come by network.
    pub fn mark_pending(&self, page: u64) {
        let _ = self
            .at(page)
            .compare_exchange(IDLE, PENDING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The network is about to write these pages: storage must not any
    /// more; one being stored now is waited for.
    pub fn claim_for_network(&self, first: u64, count: u64) {
        for page in first..first + count {
            let s = self.at(page);
            loop {
                match s.load(Ordering::Acquire) {
                    NETWORK => break,
                    STORING => std::hint::spin_loop(),
                    cur => {
                        if s.compare_exchange(cur, NETWORK, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            break;
                        }
                    }
                }
            }
        }
    }

    fn take_for_storage(&self, page: u64) -> bool {
        self.at(page)
            .compare_exchange(PENDING, STORING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn stored(&self, page: u64) {
        self.at(page).store(STORED, Ordering::Release);
    }

    fn pending(&self, page: u64) -> bool {
        self.at(page).load(Ordering::Acquire) == PENDING
    }
}

/// What the storage channel did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StorageFigures {
    /// Pages placed from storage.
    pub pages: u64,
    /// Pages a network copy had claimed first.
    pub skipped: u64,
    pub bytes: u64,
    pub busy: Duration,
}

/// Read the blocks of `entries` into their pages of `mem`, in the order
/// given, paced by `limiter`, skipping pages the network has claimed.
pub fn read_entries(
    disk: &mut Disk,
    entries: &[MapEntry],
    mem: &GuestMemory,
    landed: &Landed,
    claims: &Claims,
    limiter: &RateLimiter,
    figures: &mut StorageFigures,
) -> Result<(), TeleportError> {
    let t = Instant::now();
    let ps = mem.page_size();
    for e in entries {
        disk.check_len(e.first_block + u64::from(e.count))?;
        let mut done = 0;
        while done < u64::from(e.count) {
            let n = (u64::from(e.count) - done).min(READ_BATCH);
            let (page, block) = (e.first_page + done, e.first_block + done);
            done += n;
            if !(page..page + n).any(|p| claims.pending(p)) {
                figures.skipped += n;
                continue;
            }
            limiter.acquire(ps.bytes(n));
            let data = disk.read(block, n)?;
            figures.bytes += ps.bytes(n);
            for (i, src) in data.chunks_exact(ps.as_usize()).enumerate() {
                let p = page + i as u64;
                if !claims.take_for_storage(p) {
                    figures.skipped += 1;
                    continue;
                }
                // SAFETY: the claim gives this thread the page alone: the
                // network waits while it is STORING, and the guest does not
                // run before the reader is joined.
                unsafe { mem.pages_mut(p, 1) }.copy_from_slice(src);
                landed.set(p, page_digest(src));
                claims.stored(p);
                figures.pages += 1;
            }
        }
    }
    figures.busy += t.elapsed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_makes_both_channels_finish_together() {
        // Equal rates, no other pages: half each.
        assert!((choose_share(100.0, 100.0, 0, 1000) - 0.5).abs() < 1e-9);
        // 1 GiB guest, 75% cache, storage as fast as the network: the
        // network's quarter of other pages pushes storage to take more.
        let (o, c) = (65_536, 196_608);
        let r = choose_share(125e6, 125e6, o, c);
        assert!((r - 2.0 / 3.0).abs() < 1e-9, "{r}");
        let (net, sto) = (o as f64 + (1.0 - r) * c as f64, r * c as f64);
        assert!((net - sto).abs() < 1.0, "both channels carry equal pages");
        // Slow storage takes little; a dead network leaves all to storage.
        assert!(choose_share(125e6, 12.5e6, o, c) < 0.13);
        assert_eq!(choose_share(0.0, 1.0, o, c), 1.0);
        assert_eq!(choose_share(1.0, 0.0, o, c), 0.0);
        assert_eq!(choose_share(1.0, 1.0, o, 0), 0.0);
        // Storage far faster than the network: all of it, capped at 1.
        assert_eq!(choose_share(1e6, 1e9, o, c), 1.0);
    }

    #[test]
    fn a_share_is_between_0_and_1_or_auto() {
        assert_eq!("0.3".parse::<Share>().unwrap(), Share::Fixed(0.3));
        assert_eq!("auto".parse::<Share>().unwrap(), Share::Auto);
        assert_eq!("1".parse::<Share>().unwrap(), Share::Fixed(1.0));
        for bad in ["1.5", "-0.1", "x", "NaN"] {
            let e = bad.parse::<Share>().unwrap_err().to_string();
            assert!(e.contains("between 0 and 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn storage_never_overwrites_a_network_copy() {
        let c = Claims::new(4);
        (0..4).for_each(|p| c.mark_pending(p));
        c.claim_for_network(1, 1);
        assert!(c.take_for_storage(0));
        assert!(!c.take_for_storage(1), "the network has it");
        c.stored(0);
        // A page stored, then rewritten by network: the network wins.
        c.claim_for_network(0, 1);
        assert!(!c.take_for_storage(0));
        // A page that came by network before its mapping stays network's.
        let d = Claims::new(1);
        d.claim_for_network(0, 1);
        d.mark_pending(0);
        assert!(!d.take_for_storage(0));
    }
}
