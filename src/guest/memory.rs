//! Guest memory: a memfd mapped `MAP_SHARED`, so the guest process, the
//! sender and (on the other end) the receiver see the very same pages.
//!
//! The mapping is shared with another process that writes it concurrently,
//! so it is exposed as raw pointers, never as a long-lived `&[u8]`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::util::page::PageSize;
use crate::util::ranges::for_ranges;

/// Errors creating or mapping shared memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create memfd {name}")]
    Create {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {len} bytes of {name}")]
    Map {
        name: String,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what}: needs {needed}, but this machine has only {available} available (MemAvailable)"
    )]
    TooLarge {
        what: String,
        needed: String,
        available: String,
    },
    #[error("{0} must be a non-zero multiple of the page size ({1} bytes)")]
    BadSize(String, PageSize),
}

/// Name of guest RAM's memfd (how `livemig dirtyrate --pid` finds it).
pub const GUEST_RAM_NAME: &str = "livemig-guest-ram";

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What verification compares across the two ends for each page.
pub fn page_digest(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Refuse a size the machine cannot hold, before anything is mapped.
/// How long work over every page of `bytes` of guest memory may keep a
/// peer waiting (preallocating it, discarding it) beyond a fixed timeout:
/// 20 s per GiB. Measured here: preallocating 8 GiB took 77 s with the
/// page cache to reclaim first, about 10 s per GiB; twice that before the
/// peer counts as gone.
pub fn work_allowance(bytes: u64) -> Duration {
    Duration::from_secs(20).mul_f64(bytes as f64 / (1u64 << 30) as f64)
}

pub fn check_fits(what: &str, needed: u64) -> Result<(), MemoryError> {
    if let Some(avail) = available_bytes() {
        if needed > avail {
            return Err(MemoryError::TooLarge {
                what: what.to_string(),
                needed: crate::util::units::fmt_bytes(needed),
                available: crate::util::units::fmt_bytes(avail),
            });
        }
    }
    Ok(())
}

/// A memfd of a fixed size, mapped shared and writable in this process.
pub struct SharedRegion {
    file: File,
    map: MmapRaw,
}

impl SharedRegion {
    /// A new zero-filled memfd of `len` bytes. The fd is close-on-exec;
    /// [`crate::guest::process`] hands it to the guest process explicitly.
    pub fn create(name: &str, len: u64) -> Result<Self, MemoryError> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(|e| MemoryError::Create {
            name: name.into(),
            source: e.into(),
        })?;
        let file = File::from(fd);
        file.set_len(len).map_err(|e| MemoryError::Map {
            name: name.into(),
            len,
            source: e,
        })?;
        Self::map(name, file, len)
    }

    /// Map an inherited memfd (in the guest process).
    ///
    /// # Safety
    /// `fd` must be an open file descriptor owned by nobody else in this process.
    pub unsafe fn from_raw_fd(name: &str, fd: RawFd, len: u64) -> Result<Self, MemoryError> {
        // SAFETY: the caller guarantees `fd` is open and ours to own.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Self::map(name, file, len)
    }

    /// Map an open memfd (another process's, found through /proc).
    pub fn map(name: &str, file: File, len: u64) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map {
            name: name.into(),
            len,
            source,
        };
        let size =
            usize::try_from(len).map_err(|_| map_err(std::io::ErrorKind::InvalidInput.into()))?;
        let map = MmapOptions::new()
            .len(size)
            .map_raw(&file)
            .map_err(map_err)?;
        Ok(Self { file, map })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for SharedRegion {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Guest RAM: a shared region seen as `page_count` pages of `page_size` bytes.
pub struct GuestMemory {
    region: SharedRegion,
    page_size: PageSize,
}

impl GuestMemory {
    pub fn create(memory_bytes: u64, page_size: PageSize) -> Result<Self, MemoryError> {
        if memory_bytes == 0 || !page_size.divides(memory_bytes) {
            return Err(MemoryError::BadSize("guest memory".into(), page_size));
        }
        Ok(Self {
            region: SharedRegion::create(GUEST_RAM_NAME, memory_bytes)?,
            page_size,
        })
    }

    pub fn from_region(region: SharedRegion, page_size: PageSize) -> Self {
        Self { region, page_size }
    }

    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    pub fn page_count(&self) -> u64 {
        self.page_size.pages(self.len())
    }

    /// Pointer to the first byte of `first`.. and the byte length of `count`
    /// pages, checked against the mapping.
    pub fn pages_ptr(&self, first: u64, count: u64) -> (*mut u8, usize) {
        let end = first.checked_add(count).expect("page run overflows");
        assert!(
            end <= self.page_count(),
            "page run {first}+{count} outside guest memory"
        );
        let ps = self.page_size.as_usize();
        // SAFETY: first*page_size + count*page_size <= mapping length (checked above).
        let ptr = unsafe { self.region.as_ptr().add(first as usize * ps) };
        (ptr, count as usize * ps)
    }

    /// The bytes of a page run, for the kernel (send) or a hash.
    ///
    /// # Safety
    /// Another process may write these pages concurrently. Callers only hand
    /// the slice to the kernel (whose copy tolerates that: a torn page is
    /// re-sent because the writer marks it dirty after writing), or read it
    /// while every writer is paused (verification).
    pub unsafe fn pages(&self, first: u64, count: u64) -> &[u8] {
        let (ptr, len) = self.pages_ptr(first, count);
        // SAFETY: in bounds (pages_ptr); concurrency as documented above.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// Writable bytes of a page run, for the receiver, which is their only
    /// writer until the destination guest starts.
    ///
    /// # Safety
    /// No other writer or reader of these pages may run meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_mut(&self, first: u64, count: u64) -> &mut [u8] {
        let (ptr, len) = self.pages_ptr(first, count);
        // SAFETY: in bounds (pages_ptr); exclusivity per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Allocate every page now (QEMU's `-mem-prealloc`): reserve the memfd's
    /// pages, then fault them into this mapping, so that no page pays for
    /// the kernel's allocation and zeroing at its first write. One thread
    /// per core, each over its own range ([`crate::util::ranges`]): a 4 KiB
    /// shmem page costs the kernel about 3 us of CPU to allocate, zero and
    /// map here, so one thread caps this near 1.2 GB/s. Returns how long
    /// it took.
    pub fn prealloc(&self) -> Result<std::time::Duration, MemoryError> {
        let t = std::time::Instant::now();
        for_ranges(self.page_count(), self.len(), |first, count| {
            self.prealloc_range(first, count)
        })?;
        Ok(t.elapsed())
    }

    fn prealloc_range(&self, first: u64, count: u64) -> Result<(), MemoryError> {
        const WHAT: &str = "preallocating guest memory";
        let ps = self.page_size;
        let err = |source: std::io::Error| MemoryError::Map {
            name: WHAT.into(),
            len: ps.bytes(count),
            source,
        };
        let int =
            |v: u64| i64::try_from(v).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()));
        nix::fcntl::fallocate(
            self.region.as_fd(),
            nix::fcntl::FallocateFlags::empty(),
            int(ps.bytes(first))?,
            int(ps.bytes(count))?,
        )
        .map_err(|e| err(e.into()))?;
        self.madvise(first, count, libc::MADV_POPULATE_WRITE, WHAT)
    }

    /// Fault pages `first..first+count` into this mapping for writing (one
    /// call rather than a fault per page at first write).
    pub fn populate_write(&self, first: u64, count: u64) -> Result<(), MemoryError> {
        self.madvise(
            first,
            count,
            libc::MADV_POPULATE_WRITE,
            "preparing guest memory",
        )
    }

    /// Map every page into this process's page tables now (reading), so the
    /// first pass over memory takes no page faults here; one thread per core.
    pub fn populate(&self) -> Result<(), MemoryError> {
        for_ranges(self.page_count(), self.len(), |first, count| {
            self.madvise(
                first,
                count,
                libc::MADV_POPULATE_READ,
                "mapping guest memory",
            )
        })
    }

    fn madvise(
        &self,
        first: u64,
        count: u64,
        advice: libc::c_int,
        what: &str,
    ) -> Result<(), MemoryError> {
        let (ptr, bytes) = self.pages_ptr(first, count);
        // SAFETY: the range lies inside the mapping (pages_ptr checks it);
        // MADV_POPULATE_READ/WRITE only fault pages in, changing no contents.
        let rc = unsafe { libc::madvise(ptr.cast(), bytes, advice) };
        if rc != 0 {
            return Err(MemoryError::Map {
                name: what.into(),
                len: bytes as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Drop the contents of pages `first..first+count` (punch a hole in
    /// the memfd): every mapping sees them missing again, until written.
    pub fn discard(&self, first: u64, count: u64) -> Result<(), MemoryError> {
        let (off, len) = (self.page_size.bytes(first), self.page_size.bytes(count));
        let err = |source: std::io::Error| MemoryError::Map {
            name: "discarding guest pages".into(),
            len,
            source,
        };
        let int =
            |v: u64| i64::try_from(v).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()));
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        nix::fcntl::fallocate(self.region.as_fd(), flags, int(off)?, int(len)?)
            .map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// [`page_digest`] of one page.
    ///
    /// # Safety
    /// As for [`GuestMemory::pages`]: the page must not be written meanwhile.
    pub unsafe fn page_hash(&self, page: u64) -> u64 {
        // SAFETY: forwarded contract.
        page_digest(unsafe { self.pages(page, 1) })
    }
}
