//! `livemig sweep`: a grid over memory, workload, bandwidth and policy; at
//! each point a real migration, the model and the simulator, side by side.

use serde::Serialize;

/// One grid point's figures: measured, modelled and simulated.
/// Times in ms, bytes on the wire; `None` where a run failed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// 0-based index in the grid.
    pub point: usize,
    /// Short label, e.g. "128M hotset:wws=8M,rate=20k 1gbit xen".
    pub label: String,
    pub memory_bytes: u64,
    pub workload: String,
    pub bandwidth: String,
    pub policy: String,
    pub measured: Figures,
    pub model: Figures,
    pub simulated: Figures,
}

/// The figures compared at each point.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    /// Migration start -> destination running.
    pub total_time_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    /// Pre-copy rounds plus stop-and-copy.
    pub rounds: Option<u32>,
    pub bytes: Option<u64>,
}
