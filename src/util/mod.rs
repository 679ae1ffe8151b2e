//! Small helpers every layer uses: units and their parsing, the page size,
//! atomic page bitmaps, processes, error chains and socket I/O.

pub mod bitmap;
pub mod error;
pub mod netio;
pub mod page;
pub mod process;
pub mod text;
pub mod units;
