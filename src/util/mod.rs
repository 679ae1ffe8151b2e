//! Small helpers every layer uses: units and their parsing, processes,
//! error chains and socket I/O.

pub mod error;
pub mod netio;
pub mod process;
pub mod units;
