//! The guest: a separate OS process that writes into memfd-backed memory
//! ([`memory`]) following a [`workload`], steered through a shared
//! [`control`] block, and the trackers that find the pages it dirtied
//! ([`dirty`]). [`process`] starts, pauses and resumes it, with the
//! arguments [`args`] describes; [`vcpu`] is the write loop of its vCPU
//! threads; [`find`] finds a running one from outside; [`prepare`] writes a
//! fresh guest's initial content; [`cpucap`] caps its CPU.

pub mod args;
pub mod cache;
pub mod control;
pub mod cpucap;
pub mod dirty;
pub mod find;
pub mod memory;
pub mod prepare;
pub mod process;
pub mod uffd;
pub mod vcpu;
pub mod workload;
