//! The guest: a separate OS process that writes into memfd-backed memory
//! ([`memory`]) following a [`workload`], steered through a shared
//! [`control`] block, and the trackers that find the pages it dirtied
//! ([`dirty`]). [`process`] starts, finds, pauses and resumes it, with
//! the arguments [`args`] describes.

pub mod args;
pub mod control;
pub mod dirty;
pub mod memory;
pub mod process;
pub mod uffd;
pub mod workload;
