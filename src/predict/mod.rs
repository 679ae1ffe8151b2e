//! Predictions without moving memory: the analytical [`model`], the
//! [`simulate`]d migration, parameter [`sweep`]s and their [`plot`]s.

mod backend;
pub mod model;
pub mod plot;
pub mod simulate;
pub mod sweep;
mod teleport;
