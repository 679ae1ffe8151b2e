//! Small helpers every layer uses: units and their parsing, the page size,
//! atomic page bitmaps, cancelling on a signal, processes, work split over
//! cores by range, the floors a downtime is measured against, error chains,
//! socket I/O, a peer's text
//! made printable, and what a test does when this machine cannot run it.

pub mod bitmap;
pub mod cancel;
pub mod error;
pub mod floors;
pub mod netio;
pub mod page;
pub mod process;
pub mod ranges;
pub mod skip;
pub mod text;
pub mod units;
