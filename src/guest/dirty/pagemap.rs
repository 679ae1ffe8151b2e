//! Trackers that read the guest's page tables from outside, through
//! `/proc/<pid>/pagemap`: the guest is a black box that writes plainly.
//!
//! - `uffd-wp`: the guest registered its memory with userfaultfd in
//!   asynchronous write-protect mode ([`crate::guest::uffd`]). One `PAGEMAP_SCAN`
//!   ioctl (Linux 6.7+) returns the ranges written since they were last
//!   protected and re-protects them under the page-table lock, so a write
//!   lands either before the scan (and is reported) or after it (and faults,
//!   to be reported next time): exact, with no race and no guest help.
//! - `soft-dirty`: clear the bits with `/proc/<pid>/clear_refs` and read bit
//!   55 of each pagemap entry. Reading and clearing are two steps, so the
//!   guest's vCPUs are parked around a harvest ([`Tracker::needs_quiesce`]).
//!   Needs `CONFIG_MEM_SOFT_DIRTY`, which these machines lack.
//!
//! Structures and constants follow the uapi header `linux/fs.h`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;

use super::{DirtyError, DirtySet, Tracker};
use crate::util::page::PageSize;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Bit 55 of a pagemap entry: the page was written since soft-dirty was cleared.
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// `clear_refs` command that clears the soft-dirty bits.
const CLEAR_SOFT_DIRTY: &[u8] = b"4";
/// Regions one scan call may return; the scan loops until the range is done.
const SCAN_REGIONS: usize = 4096;

/// `struct page_region`: a run of pages with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

// The uapi sizes: the ioctl number encodes the argument's size.
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

/// A guest's memory as seen through its pagemap: which process, and where
/// in its address space.
pub struct Pagemap {
    pid: i32,
    file: File,
    addr: u64,
    pages: u64,
    page_size: PageSize,
}

impl Pagemap {
    /// Open `/proc/<pid>/pagemap` for the `pages` pages at `addr` of that
    /// process (`pid` 0: this process).
    pub fn open(pid: i32, addr: u64, pages: u64, page_size: PageSize) -> Result<Self, DirtyError> {
        let path = proc_path(pid, "pagemap");
        let file = File::open(&path).map_err(|source| DirtyError::Proc {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            pid,
            file,
            addr,
            pages,
            page_size,
        })
    }

    /// `uffd-wp`: add the pages written since the previous call and
    /// write-protect them again, in one pass of `PAGEMAP_SCAN` calls
    /// (`buf` is scratch space kept across harvests).
    pub fn take_written(
        &self,
        into: &mut DirtySet,
        buf: &mut Vec<PageRegion>,
    ) -> Result<(), DirtyError> {
        self.scan_written(0, self.pages, true, buf, |first, count| {
            into.set_range(first, count)
        })
    }

    /// Pages this pagemap covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Report (first page, count) of every run written in pages
    /// `from..to`, write-protecting them again if `protect` (a paused
    /// guest's final harvest need not: it never runs under this tracker
    /// again, and leaving the protection saves the TLB flush). `&self`
    /// only: threads may scan disjoint ranges of one pagemap at once.
    pub fn scan_written(
        &self,
        from: u64,
        to: u64,
        protect: bool,
        buf: &mut Vec<PageRegion>,
        mut found: impl FnMut(u64, u64),
    ) -> Result<(), DirtyError> {
        if buf.is_empty() {
            buf.resize(SCAN_REGIONS, PageRegion::default());
        }
        let end = self.addr + self.page_size.bytes(to.min(self.pages));
        let mut at = self.addr + self.page_size.bytes(from);
        let flags = match protect {
            true => PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            false => PM_SCAN_CHECK_WPASYNC,
        };
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: a pagemap fd and a pm_scan_arg whose vec points at
            // `buf.len()` writable page_region slots that outlive the call.
            let n = unsafe { pagemap_scan(self.file.as_raw_fd(), &mut arg) }
                .map_err(|errno| self.scan_error(errno))?;
            for r in &buf[..n as usize] {
                let first = self.page_size.page_of(r.start - self.addr);
                found(first, self.page_size.pages(r.end - r.start));
            }
            // A call may stop early (its buffer full, or the kernel's own
            // limit): walk_end says where to go on.
            if arg.walk_end <= at {
                return Err(self.scan_error(Errno::EIO));
            }
            at = arg.walk_end;
        }
        Ok(())
    }

    /// `soft-dirty`: add the pages whose soft-dirty bit is set.
    fn soft_dirty(&self, into: &mut DirtySet, buf: &mut Vec<u8>) -> Result<(), DirtyError> {
        const BATCH: u64 = 8192;
        let mut first = 0;
        while first < self.pages {
            let count = (self.pages - first).min(BATCH);
            buf.resize(count as usize * 8, 0);
            let offset = (self.page_size.page_of(self.addr) + first) * 8;
            self.file
                .read_exact_at(buf, offset)
                .map_err(|source| DirtyError::Proc {
                    path: proc_path(self.pid, "pagemap"),
                    source,
                })?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
                if e & PM_SOFT_DIRTY != 0 {
                    into.set(first + i as u64);
                }
            }
            first += count;
        }
        Ok(())
    }

    fn scan_error(&self, errno: Errno) -> DirtyError {
        DirtyError::Scan {
            pid: self.pid,
            errno,
        }
    }
}

fn proc_path(pid: i32, file: &str) -> String {
    if pid == 0 {
        format!("/proc/self/{file}")
    } else {
        format!("/proc/{pid}/{file}")
    }
}

/// The `uffd-wp` tracker: one walk, or one split over threads
/// ([`super::split`]).
pub struct UffdWpTracker {
    pagemap: Pagemap,
    bufs: Vec<Vec<PageRegion>>,
    runs: Vec<Vec<(u64, u64)>>,
}

impl UffdWpTracker {
    pub fn new(pagemap: Pagemap) -> Self {
        Self::with_parts(pagemap, 1)
    }

    /// Walk in `parts` ranges on as many threads (1: on the caller's).
    pub fn with_parts(pagemap: Pagemap, parts: usize) -> Self {
        let parts = parts.max(1);
        Self {
            pagemap,
            bufs: vec![Vec::new(); parts],
            runs: vec![Vec::new(); parts],
        }
    }
}

impl Tracker for UffdWpTracker {
    fn harvest(&mut self, into: &mut DirtySet, paused: bool) -> Result<(), DirtyError> {
        // The final harvest (paused) leaves pages unprotected: the guest
        // never runs under this tracker again.
        super::split::take_written(&self.pagemap, into, !paused, &mut self.bufs, &mut self.runs)
    }
}

/// The `soft-dirty` tracker.
pub struct SoftDirtyTracker {
    pagemap: Pagemap,
    clear_refs: File,
    buf: Vec<u8>,
}

impl SoftDirtyTracker {
    pub fn new(pagemap: Pagemap) -> Result<Self, DirtyError> {
        let path = proc_path(pagemap.pid, "clear_refs");
        let clear_refs = File::options()
            .write(true)
            .open(&path)
            .map_err(|source| DirtyError::Proc { path, source })?;
        Ok(Self {
            pagemap,
            clear_refs,
            buf: Vec::new(),
        })
    }
}

impl Tracker for SoftDirtyTracker {
    fn harvest(&mut self, into: &mut DirtySet, _paused: bool) -> Result<(), DirtyError> {
        // Read, then clear: the vCPUs are parked in between (needs_quiesce).
        self.pagemap.soft_dirty(into, &mut self.buf)?;
        self.clear_refs
            .write_all(CLEAR_SOFT_DIRTY)
            .map_err(|source| DirtyError::Proc {
                path: proc_path(self.pagemap.pid, "clear_refs"),
                source,
            })
    }

    fn needs_quiesce(&self) -> bool {
        true
    }
}

/// Whether this kernel keeps soft-dirty bits: clear them for this process,
/// write a fresh page and look at its pagemap entry. Without
/// `CONFIG_MEM_SOFT_DIRTY`, `clear_refs` accepts the command and bit 55
/// simply never appears.
pub fn soft_dirty_supported() -> Result<bool, DirtyError> {
    let page_size = PageSize::host();
    let mut page = vec![0u8; page_size.as_usize() * 2];
    let addr = (page.as_ptr() as u64).next_multiple_of(page_size.as_u64());
    std::fs::write("/proc/self/clear_refs", CLEAR_SOFT_DIRTY).map_err(|source| {
        DirtyError::Proc {
            path: "/proc/self/clear_refs".into(),
            source,
        }
    })?;
    let offset = (addr - page.as_ptr() as u64) as usize;
    // SAFETY: `offset` is inside `page`; a volatile write so it really happens.
    unsafe { page.as_mut_ptr().add(offset).write_volatile(1) };
    let pm = Pagemap::open(0, addr, 1, page_size)?;
    let mut set = DirtySet::new(1);
    pm.soft_dirty(&mut set, &mut Vec::new())?;
    std::hint::black_box(&page);
    Ok(set.contains(0))
}

/// Whether `uffd-wp` works here: open a userfaultfd with asynchronous
/// write protection, register a shared page with it, write the page and
/// find it with `PAGEMAP_SCAN`, exactly as a guest and its sender will.
pub fn probe_uffd_wp() -> Result<(), DirtyError> {
    match probe_uffd_wp_steps()? {
        true => Ok(()),
        false => Err(DirtyError::ScanMissedWrite),
    }
}

/// Whether a page written after protection was reported.
fn probe_uffd_wp_steps() -> Result<bool, DirtyError> {
    let page_size = PageSize::host();
    let region = crate::guest::memory::SharedRegion::create("livemig-probe", page_size.as_u64())?;
    let uffd = crate::guest::uffd::Uffd::open(crate::guest::uffd::WP_ASYNC_FEATURES)?;
    uffd.register_wp(region.as_ptr(), page_size.as_u64())?;
    let pm = Pagemap::open(0, region.as_ptr() as u64, 1, page_size)?;
    let (mut set, mut buf) = (DirtySet::new(1), Vec::new());
    pm.take_written(&mut set, &mut buf)?;
    set.clear();
    // SAFETY: the first byte of a page this function mapped.
    unsafe { region.as_ptr().write_volatile(1) };
    pm.take_written(&mut set, &mut buf)?;
    Ok(set.contains(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory::SharedRegion;
    use crate::guest::uffd::{Uffd, WP_ASYNC_FEATURES};

    /// Exactly the pages written between two scans, in this process.
    #[test]
    fn uffd_wp_reports_exactly_the_written_pages() {
        if let Err(e) = super::super::TrackerKind::UffdWp.check_kernel() {
            return crate::util::skip::cannot_run(e);
        }
        let ps = PageSize::host();
        let pages = 1000;
        let region = SharedRegion::create("test", ps.bytes(pages)).unwrap();
        let uffd = Uffd::open(WP_ASYNC_FEATURES).unwrap();
        uffd.register_wp(region.as_ptr(), ps.bytes(pages)).unwrap();
        let pm = Pagemap::open(0, region.as_ptr() as u64, pages, ps).unwrap();
        let mut buf = Vec::new();
        let write = |p: u64| unsafe {
            region
                .as_ptr()
                .add(ps.bytes(p) as usize + 8)
                .write_volatile(7)
        };
        // Everything is written at first (stamped); the first scan protects.
        for p in 0..pages {
            write(p);
        }
        let mut all = DirtySet::new(pages);
        pm.take_written(&mut all, &mut buf).unwrap();
        assert_eq!(all.count(), pages);
        for round in 0..3u64 {
            let written: Vec<u64> = (0..pages).filter(|p| (p * 7 + round) % 11 == 0).collect();
            written.iter().for_each(|&p| write(p));
            // A small buffer forces the scan to resume from walk_end.
            let mut small = vec![PageRegion::default(); 3];
            let mut got = DirtySet::new(pages);
            pm.take_written(&mut got, &mut small).unwrap();
            let mut want = DirtySet::new(pages);
            written.iter().for_each(|&p| want.set(p));
            assert_eq!(got, want, "round {round}");
        }
        let mut none = DirtySet::new(pages);
        pm.take_written(&mut none, &mut buf).unwrap();
        assert_eq!(none.count(), 0);
    }

    #[test]
    fn a_range_not_registered_is_refused_clearly() {
        if let Err(e) = super::super::TrackerKind::UffdWp.check_kernel() {
            return crate::util::skip::cannot_run(e);
        }
        let ps = PageSize::host();
        let region = SharedRegion::create("test", ps.bytes(4)).unwrap();
        let pm = Pagemap::open(0, region.as_ptr() as u64, 4, ps).unwrap();
        let e = pm
            .take_written(&mut DirtySet::new(4), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not registered"), "{e}");
    }
}
