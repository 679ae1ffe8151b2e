//! livemig: a live-migration emulator that moves real memory over real TCP.
//!
//! The folders are the layers of the design, lowest first; a module imports
//! only from its own folder and the folders above it in this list:
//!
//! - [`util`]: units, page sizes, processes, errors and socket helpers.
//! - [`guest`]: the guest emulator process, its memory, workload, control
//!   block and the dirty-page trackers.
//! - [`wire`]: the protocol, the data path (page runs, codecs, XBZRLE) and
//!   the rate limiter.
//! - [`report`]: the report of a migration, as JSON and as a human table.
//! - [`migration`]: the phases of a migration, the source and destination
//!   sides, post-copy, the convergence policy.
//! - [`predict`]: the analytical model, the simulator, sweeps and their plots.

pub mod guest;
pub mod migration;
pub mod plan;
pub mod predict;
pub mod report;
pub mod util;
pub mod wire;
