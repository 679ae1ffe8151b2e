//! The kernel's userfaultfd, by raw ioctls with constants from the uapi
//! header `linux/userfaultfd.h` (the `userfaultfd` crate builds its bindings
//! with bindgen, which needs libclang, and lacks `UFFD_FEATURE_WP_ASYNC`).
//!
//! The `uffd-wp` tracker uses asynchronous write protection: the guest
//! registers its memory in write-protect mode with `UFFD_FEATURE_WP_ASYNC`,
//! so a write to a protected page is resolved by the kernel itself (no fault
//! handler thread) and leaves the page "written" in its page table entry,
//! where `PAGEMAP_SCAN` ([`crate::guest::dirty::pagemap`]) finds and re-protects it.
//!
//! Post-copy uses missing-page faults: the destination guest registers its
//! memory in MISSING mode before its vCPUs run; its receiver takes the
//! userfaultfd from it (`pidfd_getfd`), reads the fault events and places
//! each page atomically with `UFFDIO_COPY` into the guest's address space,
//! which also wakes the threads waiting on it.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const UFFDIO: u8 = 0xAA;
const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only, which an
/// unprivileged process may ask for even with `vm.unprivileged_userfaultfd=0`.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// What asynchronous write-protect tracking of shared memory (a memfd) needs.
pub const WP_ASYNC_FEATURES: u64 =
    FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const EVENT_PAGEFAULT: u8 = 0x12;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

// The uapi sizes: the ioctl numbers encode the arguments' sizes.
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

nix::ioctl_readwrite!(uffdio_api, UFFDIO, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, UFFDIO, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_writeprotect, UFFDIO, 0x06, UffdioWriteprotect);
nix::ioctl_read!(uffdio_wake, UFFDIO, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, UFFDIO, 0x03, UffdioCopy);

/// Errors of userfaultfd, each naming the step that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd(2) failed: {0}")]
    Create(Errno),
    #[error("the kernel lacks userfaultfd features {missing:#x} (it offers {offered:#x}; asynchronous write protection needs Linux 6.7+)")]
    Features { missing: u64, offered: u64 },
    #[error("UFFDIO_API failed: {0}")]
    Api(Errno),
    #[error("UFFDIO_REGISTER of {len} bytes failed: {errno}")]
    Register { len: u64, errno: Errno },
    #[error("UFFDIO_WRITEPROTECT of {len} bytes failed: {errno}")]
    Writeprotect { len: u64, errno: Errno },
    #[error("UFFDIO_COPY of {len} bytes to {dst:#x} failed: {errno}")]
    Copy { dst: u64, len: u64, errno: Errno },
    #[error("UFFDIO_WAKE failed: {0}")]
    Wake(Errno),
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
    #[error("cannot take the guest's userfaultfd (fd {fd} of pid {pid}): {errno}")]
    Take { pid: i32, fd: i32, errno: Errno },
}

/// An open userfaultfd with its API handshake done.
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Open a userfaultfd and enable `features`, all of which must be offered.
    pub fn open(features: u64) -> Result<Self, UffdError> {
        // Ask first with no features: the kernel says what it offers, and a
        // request with an unknown bit would only fail with EINVAL. The API
        // handshake happens once per fd, so the real one needs a second fd.
        let offered = handshake(&open_fd()?, 0)?;
        if offered & features != features {
            return Err(UffdError::Features {
                missing: features & !offered,
                offered,
            });
        }
        let fd = open_fd()?;
        handshake(&fd, features)?;
        Ok(Self { fd })
    }

    /// Register `[start, start+len)` of this process for write protection.
    /// The range must be page aligned and mapped.
    pub fn register_wp(&self, start: *mut u8, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len,
            },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: a valid uffd and a properly laid out uffdio_register; the
        // kernel checks the range against this process's mappings.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }
            .map_err(|errno| UffdError::Register { len, errno })?;
        Ok(())
    }

    /// Register `[start, start+len)` of this process for missing-page faults.
    pub fn register_missing(&self, start: *mut u8, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len,
            },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: as in register_wp.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }
            .map_err(|errno| UffdError::Register { len, errno })?;
        Ok(())
    }

    /// The raw fd number (for another process to take with `pidfd_getfd`).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Take process `pid`'s userfaultfd `fd` (`pidfd_getfd`, Linux 5.6+).
    pub fn take_from(pid: i32, fd: i32) -> Result<Self, UffdError> {
        let err = |errno| UffdError::Take { pid, fd, errno };
        // SAFETY: plain syscalls on integers; each returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(err(Errno::last()));
        }
        // SAFETY: `pidfd` is a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: as above.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if raw < 0 {
            return Err(err(Errno::last()));
        }
        // SAFETY: `raw` is a new fd (close-on-exec) that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw as i32) },
        })
    }

    /// Place `src` (whole pages) at `dst` in the registered process's
    /// address space, atomically per page, waking its waiters. Returns the
    /// bytes placed: fewer than `src` when the kernel stopped early, and 0
    /// when the first page is there already (`EEXIST`).
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<u64, UffdError> {
        let len = src.len() as u64;
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: 0,
            copy: 0,
        };
        for _ in 0..1000 {
            c.copy = 0;
            // SAFETY: a valid uffd; `src` is readable for `len` bytes; the
            // kernel writes only into the target process's registered range.
            match unsafe { uffdio_copy(self.fd.as_raw_fd(), &mut c) } {
                Ok(_) => return Ok(len),
                // A partial copy: `copy` holds the bytes placed.
                Err(Errno::EAGAIN) if c.copy > 0 => return Ok(c.copy as u64),
                // The target's mappings are changing: try again.
                Err(Errno::EAGAIN) => std::thread::yield_now(),
                Err(Errno::EEXIST) => return Ok(0),
                Err(errno) => return Err(UffdError::Copy { dst, len, errno }),
            }
        }
        Err(UffdError::Copy {
            dst,
            len,
            errno: Errno::EAGAIN,
        })
    }

    /// Wake the threads waiting on `[start, start+len)` (a page placed by
    /// someone else meanwhile).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        // SAFETY: a valid uffd and a properly laid out uffdio_range.
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut r) }.map_err(UffdError::Wake)?;
        Ok(())
    }

    /// Wait up to `timeout` for missing-page faults; their addresses.
    pub fn faults(
        &self,
        timeout: std::time::Duration,
        into: &mut Vec<u64>,
    ) -> Result<(), UffdError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(UffdError::Read(e)),
        }
        let mut buf = [0u8; 32 * 64];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(n) => {
                    for msg in buf[..n].chunks_exact(32) {
                        if msg[0] == EVENT_PAGEFAULT {
                            let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes"));
                            into.push(addr);
                        }
                    }
                    if n < buf.len() {
                        return Ok(());
                    }
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Ok(()),
                Err(e) => return Err(UffdError::Read(e)),
            }
        }
    }

    pub fn write_protect(&self, start: *mut u8, len: u64) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len,
            },
            mode: WRITEPROTECT_MODE_WP,
        };
        // SAFETY: a valid uffd and a properly laid out uffdio_writeprotect.
        unsafe { uffdio_writeprotect(self.fd.as_raw_fd(), &mut wp) }
            .map_err(|errno| UffdError::Writeprotect { len, errno })?;
        Ok(())
    }
}

fn open_fd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: the syscall takes only flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw < 0 {
        return Err(UffdError::Create(Errno::last()));
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// The UFFDIO_API handshake; returns the features the kernel offers.
fn handshake(fd: &OwnedFd, features: u64) -> Result<u64, UffdError> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: a valid uffd and a properly laid out uffdio_api.
    unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(UffdError::Api)?;
    Ok(api.features)
}
