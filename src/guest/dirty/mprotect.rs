//! The `mprotect` tracker: write protection by `mprotect` and a SIGSEGV
//! handler in the guest process, the way user-space checkpointers tracked
//! writes before the kernel helped.
//!
//! Guest side: a harvest makes all guest memory read-only with one
//! `mprotect` (which also merges it back into one VMA). The first write to a
//! page faults; the handler makes the page writable, marks it in the shared
//! [`SharedBitmap`] and returns, and the write runs again.
//!
//! Sender side: a harvest takes the bitmap, **then** asks the guest to
//! re-protect and waits until it has. Why nothing written is missed: a page
//! is writable only after a handler unprotected it, and that handler marks
//! it next. A write that lands before the re-protection is sent by this
//! round whenever its mark was taken by this harvest (sending follows the
//! re-protection), and by a later round otherwise, because the mark is then
//! still set or not yet made. With two vCPUs, one may write a page another's
//! handler has unprotected but not yet marked: that write is reported one
//! harvest late, never lost. The final harvest is exact because the pause
//! parks every vCPU at a safe point, outside any handler, before it runs.
//! (Re-protecting first and taking second would lose writes: a fault between
//! the two unprotects and marks a page whose mark the take then clears.)
//!
//! `vm.max_map_count`: every page unprotected on its own splits the one VMA,
//! so scattered faults run out of maps at about `max_map_count / 2` pages.
//! When a single-page `mprotect` fails, the handler unprotects the aligned
//! block of 512 pages (2 MiB of 4 KiB pages) around the page and marks all of
//! it; when that fails too, all guest memory, marking every page. Both are
//! counted and reported.

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{DirtyError, DirtySet, SharedBitmap, Tracker};
use crate::guest::control::{Control, ControlBlock};
use crate::util::bitmap::{words_for, AtomicBitmap};
use crate::util::page::PageSize;

/// Pages in the block unprotected when single pages run out of VMAs.
const COALESCE_PAGES: usize = 512;
const PROTECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `si_code` of a fault on a mapped page without the access right
/// (uapi `asm-generic/siginfo.h`; the libc crate does not export it).
const SEGV_ACCERR: libc::c_int = 2;

// The handler's view of the guest, set once by `install`.
static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(0);
static BITMAP: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static CONTROL: AtomicPtr<ControlBlock> = AtomicPtr::new(std::ptr::null_mut());

/// Guest side: install the SIGSEGV handler for `len` bytes of guest memory
/// at `base`, marking `bitmap`. Memory stays writable until the first
/// harvest protects it. One region per process: the handler is process-wide.
///
/// # Safety
/// `base..base+len` must be a mapping of this process, and it, `bitmap`'s
/// mapping and `control`'s must stay mapped for as long as any thread may
/// write to the region (the guest maps them for its whole life).
pub unsafe fn install(base: *mut u8, len: usize, bitmap: &SharedBitmap, control: &Control) {
    let page_size = PageSize::host();
    let pages = page_size.pages(len as u64);
    assert!(
        bitmap.bits().pages() >= pages,
        "the bitmap has fewer bits than guest memory has pages"
    );
    BASE.store(base as usize, Ordering::Relaxed);
    LEN.store(len, Ordering::Relaxed);
    PAGE.store(page_size.as_usize(), Ordering::Relaxed);
    BITMAP.store(
        bitmap.bits().storage().as_ptr().cast_mut(),
        Ordering::Relaxed,
    );
    CONTROL.store(
        (control.block() as *const ControlBlock).cast_mut(),
        Ordering::Release,
    );
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe
    // (atomics and mprotect only) and has the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        let rc = libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        assert_eq!(rc, 0, "sigaction(SIGSEGV) failed");
    }
}

/// Guest side: serve the sender's re-protection requests. Never returns.
pub fn serve(control: &Control) -> ! {
    let (base, len) = (BASE.load(Ordering::Relaxed), LEN.load(Ordering::Relaxed));
    control.serve_protect(|| {
        // SAFETY: the guest memory mapping installed above, for its whole length.
        let rc = unsafe { libc::mprotect(base as *mut c_void, len, libc::PROT_READ) };
        // Making a whole mapping read-only needs no new VMA: it cannot fail
        // short of a bug, and tracking would silently stop if it did.
        assert_eq!(
            rc,
            0,
            "mprotect of guest memory failed: {}",
            nix::errno::Errno::last()
        );
    })
}

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let (base, len, ps) = (
        BASE.load(Ordering::Relaxed),
        LEN.load(Ordering::Relaxed),
        PAGE.load(Ordering::Relaxed),
    );
    if code != SEGV_ACCERR || addr < base || addr >= base + len {
        // Not a write to protected guest memory: a real crash (or a SIGSEGV
        // sent with kill). Restore the default action; returning runs the
        // faulting access again, which now kills the process.
        // SAFETY: signal(2) is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    // SAFETY: errno is thread-local; the interrupted code must see its own.
    let saved_errno = unsafe { *libc::__errno_location() };
    let page = (addr - base) / ps;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let unprotect = |first: usize, count: usize| {
        // SAFETY: [first, first+count) pages lie inside the guest mapping.
        unsafe { libc::mprotect((base + first * ps) as *mut c_void, count * ps, rw) == 0 }
    };
    // SAFETY: set by `install` before any vCPU runs; the block outlives them.
    let control = unsafe { &*CONTROL.load(Ordering::Acquire) };
    let pages = len / ps;
    let (first, count) = if unprotect(page, 1) {
        (page, 1)
    } else {
        control.tracker_coalesced.fetch_add(1, Ordering::Relaxed);
        let first = page / COALESCE_PAGES * COALESCE_PAGES;
        let count = COALESCE_PAGES.min(pages - first);
        if unprotect(first, count) {
            (first, count)
        } else if unprotect(0, pages) {
            (0, pages)
        } else {
            // SAFETY: abort is async-signal-safe; a write we cannot let
            // through unrecorded must not happen at all.
            unsafe { libc::abort() }
        }
    };
    // Mark after unprotecting (see the module doc).
    let words = BITMAP.load(Ordering::Relaxed);
    // SAFETY: the bitmap holds a word for every 64 guest pages and stays
    // mapped (install); its words are only ever touched atomically.
    let words = unsafe { std::slice::from_raw_parts(words, words_for(pages as u64)) };
    AtomicBitmap::over(words, pages as u64).mark_range(first as u64, count as u64);
    control.tracker_faults.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// The sender side of `mprotect`.
pub struct MprotectTracker {
    bitmap: SharedBitmap,
    control: Control,
    pid: i32,
}

impl MprotectTracker {
    pub fn new(bitmap: SharedBitmap, control: Control, pid: i32) -> Self {
        Self {
            bitmap,
            control,
            pid,
        }
    }
}

impl Tracker for MprotectTracker {
    fn harvest(&mut self, into: &mut DirtySet, paused: bool) -> Result<(), DirtyError> {
        self.bitmap.take_into(into);
        if paused {
            return Ok(());
        }
        let t = Instant::now();
        while !self.control.request_protect(Duration::from_millis(100)) {
            let gone = crate::util::process::process_gone(self.pid);
            if gone || t.elapsed() > PROTECT_TIMEOUT {
                let what = if gone {
                    "exited".into()
                } else {
                    format!(
                        "did not re-protect its memory within {} s",
                        PROTECT_TIMEOUT.as_secs()
                    )
                };
                return Err(DirtyError::Guest {
                    pid: self.pid,
                    what,
                });
            }
        }
        Ok(())
    }
}
