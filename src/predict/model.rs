//! `livemig model`: the analytical pre-copy model, round by round.
//!
//! Memory M pages, write rate w pages/s, rate R_i bytes/s in round i (the
//! limit or the link, whichever is lower). Round 0 sends V_0 = M pages and
//! lasts T_i = overhead + V_i·page/R_i; the next round sends the pages
//! dirtied meanwhile, V_{i+1} = D(w·T_i). Two variants of D:
//! - `classic`: every write dirties a new page, D(W) = min(W, M): the
//!   textbook λ = D/R model, V_i = M·λ^i (Clark et al., Strunk).
//! - `wws`: the expected number of *distinct* pages W writes hit under the
//!   workload's pattern; a hot set saturates, so it is sent every round and
//!   last at stop-and-copy, as a writable-working-set model expects.
//!
//! Whether to stop is decided by the sender's own code ([`Precopy`]) on the
//! predicted figures, so every policy (xen, qemu, fixed:N) and the dynamic
//! rate limiter are modelled by the rules they run by. Downtime is the last
//! V_n at the highest allowed rate plus a fixed overhead. Framing is
//! counted as one Pages header per page after round 0 (scattered pages).

use std::time::Duration;

use serde::Serialize;

use crate::guest::workload::{Layout, Pattern};
use crate::migration::machine::Migration;
use crate::migration::policy::{Policy, Precopy, StopReason};
use crate::predict::backend::{Dirtying, Network, OwnLink, Prediction};
use crate::predict::simulate::{check, wire_bytes, SimConfig, SimulateError};
use crate::report::{Report, MODEL};
use crate::util::units::PageRate;
use crate::wire::datapath::chunk_pages;

/// Which dirty-page function the model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Classic,
    Wws,
}

/// A variant name the model does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected classic or wws")]
pub struct UnknownVariant;

impl std::str::FromStr for Variant {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, UnknownVariant> {
        match s {
            "classic" => Ok(Self::Classic),
            "wws" => Ok(Self::Wws),
            _ => Err(UnknownVariant),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Variant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Wws => "wws",
        }
    }
}

/// Expected distinct pages that `writes` writes of workload `w` hit.
pub fn distinct_pages(w: &Layout, writes: f64, variant: Variant) -> f64 {
    let n = w.page_count as f64;
    let writes = writes.max(0.0);
    if variant == Variant::Classic {
        return writes.min(n);
    }
    match &w.pattern {
        Pattern::Idle => 0.0,
        // Each of n pages is missed by every write with probability (1-1/n).
        Pattern::Uniform => n * -f64::exp_m1(writes * f64::ln_1p(-1.0 / n)),
        &Pattern::HotSet { wws_pages, hot } => {
            // A write goes to the hot set with probability `hot`, else
            // anywhere (the hot set included).
            let h = wws_pages as f64;
            let cold = (1.0 - hot) / n;
            let miss = |p: f64| f64::exp(-writes * p);
            h * (1.0 - miss(hot / h + cold)) + (n - h) * (1.0 - miss(cold))
        }
        // Sweeps walk their range in order.
        Pattern::Sweep { from_page, to_page } => writes.min((to_page - from_page) as f64),
        // Page k is missed by every write with probability (1-p_k).
        &Pattern::Zipf { pages, s, .. } => {
            let weights = (1..=pages).map(|k| (k as f64).powf(-s));
            let h: f64 = weights.clone().sum();
            weights
                .map(|w| -f64::exp_m1(writes * f64::ln_1p(-w / h)))
                .sum()
        }
        // Only phases and traces need a clock; check() refuses them, and
        // compute runs flat out (rate=max), which no prediction takes.
        Pattern::Compute { wws_pages, .. } => writes.min(*wws_pages as f64),
        Pattern::Phases(_) | Pattern::Trace(_) => writes.min(n),
    }
}

/// Predict one migration; the report has the shape of a real run's, with
/// `mode` "model".
pub fn run(cfg: &SimConfig, variant: Variant) -> Result<Report, SimulateError> {
    run_on(cfg, variant, OwnLink)
}

/// [`run`] over a network of the caller's.
pub fn run_on(
    cfg: &SimConfig,
    variant: Variant,
    net: impl Network,
) -> Result<Report, SimulateError> {
    let m = &cfg.migration;
    let w = check(cfg)?;
    let rate = match (w.is_idle(), w.rate) {
        (true, _) => 0.0,
        (false, PageRate::PerSec(r)) => r,
        (false, PageRate::Max) => return Err(SimulateError::MaxRate),
    };
    let report = Report {
        mode: MODEL,
        tracker: "none".into(),
        page_size: cfg.page_size.as_u64(),
        guest_target_rate_pps: (rate > 0.0).then_some(rate),
        ..m.report()
    };
    let model = Model {
        todo: w.page_count,
        w,
        variant,
        rate,
    };
    let model = Prediction::new(cfg, model, net);
    let mut migration = Migration::new(model, m.mode, m.policy_config(cfg.page_size), report);
    migration.run()?;
    Ok(migration.report)
}

/// The model's dirty pages: expected counts, no pages.
struct Model {
    w: Layout,
    variant: Variant,
    /// The guest's writes per second.
    rate: f64,
    /// Pages the next round sends.
    todo: u64,
}

impl Dirtying for Model {
    fn pending(&self) -> u64 {
        self.todo
    }

    fn rate_pps(&self) -> f64 {
        self.rate
    }

    fn round_bytes(&self, round: u32, _stop_and_copy: bool, limit: Option<u64>) -> u64 {
        round_bytes(&self.w, self.todo, round, limit)
    }

    fn send(&mut self, pages: u64) {
        self.todo = self.todo.saturating_sub(pages);
    }

    fn run(&mut self, d: Duration) -> Result<u64, SimulateError> {
        // Expected figures, rounded to whole pages as the sender counts them.
        let writes = self.rate * d.as_secs_f64();
        let dirtied = distinct_pages(&self.w, writes, self.variant).round() as u64;
        // Pages still pending join them, overlapping as independent sets
        // of the guest's pages would.
        let (u, n) = (self.todo as f64, self.w.page_count as f64);
        let d = dirtied as f64;
        self.todo = (u + d - u * d / n).round() as u64;
        Ok(dirtied)
    }

    /// A fixed point (past round 0, whose limiter credit differs): every
    /// later round is this one again, and a qemu decision depends on the
    /// last round only, so only the clock stops it (threshold policy).
    fn fast_forward(
        &mut self,
        cfg: &SimConfig,
        precopy: &Precopy,
        now: &mut Duration,
        report: &mut Report,
    ) -> Option<StopReason> {
        let m = &cfg.migration;
        let f = precopy.rounds().last()?;
        let same = (f.pages, f.rate_limit) == (f.dirty_pages, precopy.limit());
        if f.round < 1 || !same || !matches!(m.policy, Policy::Threshold) {
            return None;
        }
        let (seconds, round_bytes, todo) = (f.duration.as_secs_f64(), f.bytes, self.todo);
        let left = m.max_time.saturating_sub(*now).as_secs_f64();
        let more = (left / seconds).ceil();
        *now += Duration::from_secs_f64(more * seconds);
        // f64 -> u64 saturates: a count of rounds.
        let more = more as u64;
        report.transferred_bytes = report
            .transferred_bytes
            .saturating_add(more.saturating_mul(round_bytes));
        report.transferred_pages = report
            .transferred_pages
            .saturating_add(more.saturating_mul(todo));
        report.rounds_not_listed = more;
        let expected = crate::migration::policy::expected_downtime(precopy.config(), f)
            .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3);
        report.note = Some(format!(
            "does not converge: every round leaves the same {todo} pages dirty (the guest writes {:.1} MB/s; rounds move {:.1} MB/s), and sending them would take {expected:.1} ms, above --downtime-limit {:.1} ms; only --max-time ends pre-copy ({more} more identical rounds, not listed)",
            self.rate * self.w.page_size.as_u64() as f64 / 1e6,
            round_bytes as f64 / seconds / 1e6,
            m.downtime_limit.as_secs_f64() * 1e3,
        ));
        Some(StopReason::MaxTime)
    }
}

/// Bytes of a round of `pages` pages: RoundStart, the pages with a Pages
/// header per run, RoundEnd. Round 0 and sweeps are contiguous; otherwise
/// the pages are taken as a random subset of the pages the pattern reaches,
/// which has about k(1 - k/n) runs, cut further into chunks.
fn round_bytes(w: &Layout, pages: u64, round: u32, limit: Option<u64>) -> u64 {
    let ps = w.page_size;
    let chunk = chunk_pages(limit, ps);
    let reach = match w.pattern {
        Pattern::HotSet { wws_pages, hot } if hot >= 1.0 => wws_pages,
        _ => w.page_count,
    };
    let frames = match (round, &w.pattern) {
        (0, _) | (_, Pattern::Sweep { .. }) => pages.div_ceil(chunk),
        _ => {
            let k = pages.min(reach) as f64;
            // f64 -> u64: an expected count of runs, below `pages`.
            (k * (1.0 - k / reach as f64)) as u64 + pages.div_ceil(chunk)
        }
    };
    wire_bytes(round, false, pages, frames, ps.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(spec: &str) -> Layout {
        let w: crate::guest::workload::Workload = spec.parse().unwrap();
        w.layout(4096 * 4096, crate::util::page::PageSize::MIN)
            .unwrap()
    }

    #[test]
    fn variants_read_back() {
        for v in [Variant::Classic, Variant::Wws] {
            assert_eq!(v.to_string().parse(), Ok(v));
        }
        assert_eq!("exact".parse::<Variant>(), Err(UnknownVariant));
    }

    #[test]
    fn distinct_pages_saturate_where_they_should() {
        let u = w("uniform:rate=1k");
        assert_eq!(distinct_pages(&u, 0.0, Variant::Wws), 0.0);
        // One write, one page; a page count's worth covers 1 - 1/e.
        assert!((distinct_pages(&u, 1.0, Variant::Wws) - 1.0).abs() < 1e-9);
        let e = distinct_pages(&u, 4096.0, Variant::Wws) / 4096.0;
        assert!((e - (1.0 - (-1.0f64).exp())).abs() < 1e-3, "{e}");
        assert_eq!(distinct_pages(&u, 1e9, Variant::Classic), 4096.0);
        // A hot set of 256 pages taking every write saturates at 256.
        let h = w("hotset:wws=1M,rate=1k,hot=1");
        assert!((distinct_pages(&h, 1e6, Variant::Wws) - 256.0).abs() < 1e-6);
        assert_eq!(
            distinct_pages(&w("sweep:from=0,to=1M"), 1e6, Variant::Wws),
            256.0
        );
        assert_eq!(distinct_pages(&w("idle"), 1e6, Variant::Wws), 0.0);
    }
}
