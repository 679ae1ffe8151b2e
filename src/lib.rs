//! livemig: a live-migration emulator that moves real memory over real TCP.
//!
//! A guest emulator process ([`guest`]) writes into a memfd-backed region;
//! the [`sender`] harvests dirty pages ([`dirty`]), streams pre-copy rounds
//! paced by a [`ratelimit`] until a [`policy`] says stop, pauses the guest and
//! copies the rest; the [`receiver`] rebuilds the memory, resumes the guest and
//! verifies every page. [`protocol`] is the wire format, [`report`] the figures.

pub mod control;
pub mod datapath;
pub mod dirty;
pub mod dirtyrate;
pub mod guest;
pub mod memory;
pub mod migrate;
pub mod model;
pub mod plot;
pub mod policy;
pub mod postcopy;
pub mod protocol;
pub mod ratelimit;
pub mod receiver;
pub mod reduce;
pub mod report;
pub mod sender;
pub mod simulate;
pub mod sweep;
pub mod uffd;
pub mod units;
pub mod workload;
pub mod xbzrle;
