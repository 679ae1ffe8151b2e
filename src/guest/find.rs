//! Finding a running guest from outside (`livemig dirtyrate --pid`): its
//! memory mapping in `/proc/<pid>/maps` and its control block among its open
//! files, both named memfds.

use std::sync::atomic::Ordering;

use crate::guest::control::{Control, CONTROL_NAME};
use crate::guest::memory::{SharedRegion, GUEST_RAM_NAME};
use crate::guest::process::GuestError;

/// A guest process found through /proc (`livemig dirtyrate --pid`): where
/// its memory is mapped, and its control block.
pub struct Found {
    pub pid: i32,
    pub mem_addr: u64,
    pub mem_bytes: u64,
    pub control: Control,
}

/// Find livemig guest `pid`: its RAM mapping in `/proc/<pid>/maps` and its
/// control block among its open fds (both are named memfds).
pub fn find(pid: i32) -> Result<Found, GuestError> {
    let not = |why: String| GuestError::NotAGuest { pid, why };
    if pid <= 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(not("no such process".into()));
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| not(format!("cannot read /proc/{pid}/maps ({e})")))?;
    let ram = maps
        .lines()
        .find(|l| l.contains(&format!("/memfd:{GUEST_RAM_NAME} ")))
        .ok_or_else(|| not(format!("no {GUEST_RAM_NAME} mapping in /proc/{pid}/maps")))?;
    let (start, end) = ram
        .split_whitespace()
        .next()
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .ok_or_else(|| not(format!("unreadable maps line {ram:?}")))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| not(format!("cannot list /proc/{pid}/fd ({e})")))?;
    let control = fds
        .flatten()
        .find(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| {
                t.to_string_lossy()
                    .starts_with(&format!("/memfd:{CONTROL_NAME} "))
            })
        })
        .ok_or_else(|| not(format!("no {CONTROL_NAME} memfd among its open files")))?;
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(control.path())
        .map_err(|e| not(format!("cannot open its control block ({e})")))?;
    let len = crate::guest::control::block_len();
    if file.metadata().map_or(0, |m| m.len()) < len {
        return Err(not(format!("its {CONTROL_NAME} memfd is too small")));
    }
    let control = Control::from_region(SharedRegion::map(CONTROL_NAME, file, len)?);
    let b = control.block();
    if b.magic.load(Ordering::Acquire) != crate::guest::control::MAGIC {
        return Err(not(format!(
            "its {CONTROL_NAME} memfd is not a control block of this livemig version"
        )));
    }
    // The owner (livemig run, send) maps the same memfds: point it at its guest.
    let guest = b.guest_pid.load(Ordering::Acquire);
    if guest == 0 {
        return Err(not("its control block names no guest process".into()));
    }
    if guest != pid as u32 || b.mem_addr.load(Ordering::Acquire) != start {
        return Err(not(format!(
            "it runs guest {guest}: attach to process {guest} instead"
        )));
    }
    Ok(Found {
        pid,
        mem_addr: start,
        mem_bytes: end - start,
        control,
    })
}
