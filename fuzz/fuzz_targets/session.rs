//! The destination's handling of a whole one-connection session, fed from
//! bytes: the handshake, every round's frames into memory, the device
//! state, the verification (`livemig::migration::destination::replay`).
//! Whatever the bytes, it must end, without a panic, either verified or
//! in one clean line of error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig::migration::destination::{replay, ReplayConn};

/// The memory the seeds' sessions migrate (a `Hello` for another size is
/// refused, so no input allocates more).
const MEMORY_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let (report, result) = replay(&mut ReplayConn::new(data), MEMORY_BYTES);
    if let Err(e) = &result {
        let line = livemig::util::error::error_chain(e);
        assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert_eq!(report.error.as_deref(), Some(line.as_str()));
    }
    assert!(report.pages_received <= MEMORY_BYTES / 4096 * 64 * 1024);
});
