//! Socket I/O helpers shared by both ends.

use std::io::{IoSlice, Write};
use std::time::Duration;

/// How long socket reads and writes may block before the peer counts as gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// `write_all` for vectored writes (std's is unstable).
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
