//! One migration: the [`source`] and [`destination`] sides, the
//! [`postcopy`] demand paging, the convergence [`policy`], both ends in
//! one process ([`local`]), the dirty-rate probe ([`dirtyrate`]) and its
//! trace [`record`]er, and how a
//! [`cancel`] reaches the receiver.

pub mod cancel;
pub mod destination;
pub mod dirtyrate;
pub mod gauge;
pub mod iteration;
pub mod local;
pub mod machine;
pub mod phases;
pub mod policy;
pub mod postcopy;
pub mod record;
pub mod sampler;
pub mod source;
pub mod teleport;
pub mod throttle;
