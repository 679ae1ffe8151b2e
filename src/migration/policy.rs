//! When to stop pre-copy iterating. Pure functions of the completed rounds,
//! so the real sender, the simulator and the analytical model decide alike.

use crate::migration::iteration::Iteration;

mod explain;
use crate::report::{ms, RoundReport};
use crate::util::page::PageSize;
use crate::wire::ratelimit::Bandwidth;
use std::time::Duration;

/// Xen stops after this many live rounds (`DEF_MAX_ITERS`: the last
/// iteration, paused, is the 30th)...
pub const XEN_MAX_ROUNDS: usize = 29;
/// ...or when its last round sent fewer pages than this...
pub const XEN_MIN_DIRTY_PAGES: u64 = 50;
/// ...or when it has sent this many times the guest's memory.
pub const XEN_MAX_SENT_FACTOR: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Xen's heuristics: few dirty pages, round cap, sent cap, rate at max.
    Xen,
    /// QEMU's migration thread: send while estimating what is pending,
    /// sync the dirty pages only when that falls below bandwidth x downtime
    /// limit, complete if still below (see [`crate::migration::iteration`]).
    Qemu,
    /// Full passes, stop when the expected downtime (dirty bytes / the
    /// last round's bandwidth) fits the downtime limit: livemig's first
    /// `qemu`, kept for teaching.
    Threshold,
    /// Exactly N pre-copy rounds (round 0 included); for experiments.
    Fixed(u32),
}

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("use at least 1 round (round 0 sends every page)")]
    NoRounds,
    #[error("fixed:N needs a whole number of rounds, like fixed:5")]
    Rounds(#[source] std::num::ParseIntError),
    #[error("expected xen, qemu, threshold or fixed:N")]
    Unknown,
}

impl std::str::FromStr for Policy {
    type Err = PolicyError;

    /// `xen` | `qemu` | `threshold` | `fixed:N` with N >= 1.
    fn from_str(s: &str) -> Result<Policy, PolicyError> {
        match s.trim() {
            "xen" => Ok(Policy::Xen),
            "qemu" => Ok(Policy::Qemu),
            "threshold" => Ok(Policy::Threshold),
            t => match t.strip_prefix("fixed:").map(|n| n.trim().parse::<u32>()) {
                Some(Ok(0)) => Err(PolicyError::NoRounds),
                Some(Ok(n)) => Ok(Policy::Fixed(n)),
                Some(Err(e)) => Err(PolicyError::Rounds(e)),
                None => Err(PolicyError::Unknown),
            },
        }
    }
}

/// Prints the form `Policy::from_str` reads back.
impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Xen => f.write_str("xen"),
            Policy::Qemu => f.write_str("qemu"),
            Policy::Threshold => f.write_str("threshold"),
            Policy::Fixed(n) => write!(f, "fixed:{n}"),
        }
    }
}

/// Figures of one completed pre-copy round (round 0 = every page). Under
/// `qemu` a round is one sync period and may leave pages unsent.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoundFigures {
    /// 0-based round number.
    pub round: u32,
    /// Pages sent in this round.
    pub pages: u64,
    /// Bytes put on the wire in this round (payload and framing).
    pub bytes: u64,
    /// Wall time the round took.
    pub duration: Duration,
    /// Pages found dirty when the round ended (written while it ran): the next round's work.
    pub dirty_pages: u64,
    /// Rate limit in force during the round, bytes/s (None = unlimited).
    pub rate_limit: Option<u64>,
    /// Pages of this round left unsent when the policy cut it short (`qemu`).
    pub carried_pages: u64,
    /// The next round's work where it is not `dirty_pages`: the pages
    /// found dirty and those carried over, counted once.
    pub pending: Option<u64>,
    /// `qemu`: the threshold in force at the round's sync, bytes.
    pub threshold_bytes: Option<u64>,
}

impl RoundFigures {
    /// Bytes/s achieved; 0.0 for a zero duration. (u64 -> f64 of a measured figure.)
    pub fn throughput_bytes_per_s(&self) -> f64 {
        per_sec(self.bytes, self.duration)
    }

    /// Pages dirtied per second while the round ran; 0.0 for a zero duration.
    pub fn dirty_rate_pps(&self) -> f64 {
        per_sec(self.dirty_pages, self.duration)
    }

    /// The pages the next round starts with.
    pub fn pending_pages(&self) -> u64 {
        self.pending.unwrap_or(self.dirty_pages)
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Everything the decision depends on besides the rounds.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub policy: Policy,
    pub bandwidth: Bandwidth,
    /// Bytes per page.
    pub page_size: PageSize,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Longest acceptable stop-and-copy pause (qemu and threshold policies).
    pub downtime_limit: Duration,
    /// Bytes/s the switch-over will have, overriding the measured
    /// bandwidth in qemu's threshold (QEMU 8.2's avail-switchover-bandwidth).
    pub switchover_bandwidth: Option<u64>,
    /// Stop iterating once the migration has run this long (all policies).
    pub max_time: Duration,
    /// How the guest may be slowed down to converge (any policy).
    pub throttling: crate::migration::throttle::Throttling,
}

/// Why pre-copy stopped iterating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    FewDirtyPages,
    DowntimeLimit,
    RoundLimit,
    SentLimit,
    RateAtMax,
    DirtyRateAboveMax,
    MaxTime,
    FixedRounds,
}

impl StopReason {
    /// The same snake_case name serde uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::FewDirtyPages => "few_dirty_pages",
            StopReason::DowntimeLimit => "downtime_limit",
            StopReason::RoundLimit => "round_limit",
            StopReason::SentLimit => "sent_limit",
            StopReason::RateAtMax => "rate_at_max",
            StopReason::DirtyRateAboveMax => "dirty_rate_above_max",
            StopReason::MaxTime => "max_time",
            StopReason::FixedRounds => "fixed_rounds",
        }
    }

    /// Whether stopping for this reason means pre-copy converged (the
    /// remaining dirty memory became small), did not (a cap stopped it), or
    /// (fixed rounds) says nothing either way.
    pub fn converged(&self) -> Option<bool> {
        match self {
            StopReason::FewDirtyPages | StopReason::DowntimeLimit => Some(true),
            // The clock stopped it: whether it would have converged is open.
            StopReason::FixedRounds | StopReason::MaxTime => None,
            _ => Some(false),
        }
    }

    /// One human sentence for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            StopReason::FewDirtyPages => "The last round sent fewer than 50 pages, so the rest fits a short pause.",
            StopReason::DowntimeLimit => {
                "The remaining dirty memory can be sent within the downtime limit at the measured bandwidth."
            }
            StopReason::RoundLimit => "The limit of 29 live rounds was reached (the paused last one is the 30th).",
            StopReason::SentLimit => "Pre-copy had already sent more than 3 times the guest's memory.",
            StopReason::RateAtMax => {
                "The rate limit reached its maximum and the last round sent more than the one before."
            }
            StopReason::DirtyRateAboveMax => {
                "The guest dirties memory faster than the maximum bandwidth, so pre-copy cannot converge."
            }
            StopReason::MaxTime => "The migration reached its maximum time.",
            StopReason::FixedRounds => "The fixed number of pre-copy rounds was done.",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Continue,
    Stop(StopReason),
}

/// Expected downtime if we stopped now: pending bytes / bandwidth measured
/// in the last round (None if it measured no bandwidth).
pub fn expected_downtime(cfg: &PolicyConfig, last: &RoundFigures) -> Option<Duration> {
    let bw = last.throughput_bytes_per_s();
    if bw <= 0.0 {
        return None;
    }
    // u64 -> f64: byte counts of a guest, exact far beyond any real memory size.
    let dirty = last.pending_pages().saturating_mul(cfg.page_size.as_u64()) as f64;
    Some(Duration::try_from_secs_f64(dirty / bw).unwrap_or(Duration::MAX))
}

/// Bytes of memory sent so far: Xen counts pages, not framing.
fn memory_sent(cfg: &PolicyConfig, rounds: &[RoundFigures]) -> u64 {
    rounds.iter().fold(0u64, |acc, r| {
        acc.saturating_add(r.pages.saturating_mul(cfg.page_size.as_u64()))
    })
}

/// Decide after each completed round. `rounds` is every completed round so
/// far (non-empty), `elapsed` the time since migration start.
pub fn decide(cfg: &PolicyConfig, rounds: &[RoundFigures], elapsed: Duration) -> Decision {
    use StopReason::*;
    if elapsed >= cfg.max_time {
        return Decision::Stop(MaxTime);
    }
    if let Policy::Fixed(n) = cfg.policy {
        // u32 -> usize is lossless on every target std supports with threads.
        let done = rounds.len() >= usize::try_from(n).unwrap_or(usize::MAX);
        return if done {
            Decision::Stop(FixedRounds)
        } else {
            Decision::Continue
        };
    }
    let Some(last) = rounds.last() else {
        return Decision::Continue;
    };
    // u64 -> f64 of the page size: exact.
    if cfg
        .bandwidth
        .dirty_rate_above_max(last.dirty_rate_pps() * cfg.page_size.as_u64() as f64)
    {
        return Decision::Stop(DirtyRateAboveMax);
    }
    let stop = match cfg.policy {
        Policy::Xen => {
            let sent = memory_sent(cfg, rounds);
            let prev = rounds.len().checked_sub(2).map(|i| &rounds[i]);
            let dynamic = matches!(cfg.bandwidth, Bandwidth::Dynamic { .. });
            // xc_domain_save weighs the round just sent (sent_this_iter),
            // not the dirty pages found after it.
            if last.pages < XEN_MIN_DIRTY_PAGES {
                Some(FewDirtyPages)
            } else if rounds.len() >= XEN_MAX_ROUNDS {
                Some(RoundLimit)
            } else if sent > cfg.memory_bytes.saturating_mul(XEN_MAX_SENT_FACTOR) {
                Some(SentLimit)
            } else if dynamic
                && last.rate_limit == cfg.bandwidth.max()
                && prev.is_some_and(|p| last.pages > p.pages)
            {
                Some(RateAtMax)
            } else {
                None
            }
        }
        Policy::Qemu => {
            // After the sync: complete if the exact pending bytes are
            // below the threshold the thread had measured.
            let pending = last.pending_pages().saturating_mul(cfg.page_size.as_u64());
            let fits = pending == 0 || last.threshold_bytes.is_some_and(|t| pending < t);
            fits.then_some(DowntimeLimit)
        }
        Policy::Threshold => {
            let fits = last.pending_pages() == 0
                || expected_downtime(cfg, last).is_some_and(|d| d <= cfg.downtime_limit);
            fits.then_some(DowntimeLimit)
        }
        Policy::Fixed(_) => unreachable!("handled above"),
    };
    stop.map_or(Decision::Continue, Decision::Stop)
}

/// The pre-copy loop's decisions, one instance per migration, shared by the
/// real sender and the simulator so both iterate by the very same rules:
/// after each round, record its figures, set the next round's rate limit
/// (Clark et al.'s rule for a dynamic bandwidth) and ask the policy whether
/// to stop.
#[derive(Clone, Debug)]
pub struct Precopy {
    cfg: PolicyConfig,
    rounds: Vec<RoundFigures>,
    limit: Option<u64>,
    /// `qemu`: the migration thread's bandwidth periods and threshold.
    iteration: Option<Iteration>,
}

impl Precopy {
    pub fn new(cfg: PolicyConfig) -> Self {
        let limit = cfg.bandwidth.initial_limit();
        Self {
            cfg,
            rounds: Vec::new(),
            limit,
            iteration: None,
        }
    }

    /// Pre-copy starts sending at `now`: under `qemu` the migration
    /// thread's first bandwidth period starts.
    pub fn start(&mut self, now: Duration) {
        if self.cfg.policy == Policy::Qemu {
            let c = &self.cfg;
            self.iteration = Some(Iteration::new(
                c.downtime_limit,
                c.switchover_bandwidth,
                now,
            ));
        }
    }

    /// `qemu`: what decides when a round ends (None: a round is a full pass).
    pub fn iteration_mut(&mut self) -> Option<&mut Iteration> {
        self.iteration.as_mut()
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Rate limit for the next round, bytes/s (None: unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The rounds done so far.
    pub fn rounds(&self) -> &[RoundFigures] {
        &self.rounds
    }

    /// Record a finished round (`elapsed`: since migration start) and decide.
    pub fn end_round(&mut self, f: RoundFigures, elapsed: Duration) -> Decision {
        // u64 -> f64 of the page size: exact.
        let dirty_bytes_per_s = f.dirty_rate_pps() * self.cfg.page_size.as_u64() as f64;
        self.limit = self.cfg.bandwidth.next_limit(dirty_bytes_per_s);
        self.rounds.push(f);
        decide(&self.cfg, &self.rounds, elapsed)
    }

    /// Stop-and-copy runs at the highest rate allowed (Clark et al.);
    /// QEMU's `ram_save_complete` sends regardless of the rate limit.
    pub fn final_limit(&self) -> Option<u64> {
        match self.cfg.policy {
            Policy::Qemu => None,
            _ => self.cfg.bandwidth.max().or(self.limit),
        }
    }
}

impl RoundFigures {
    /// This round's row in the report.
    pub fn to_report(
        &self,
        harvest: std::time::Duration,
        stop_and_copy: bool,
        decision: String,
    ) -> RoundReport {
        RoundReport {
            round: self.round,
            pages: self.pages,
            bytes: self.bytes,
            duration_ms: ms(self.duration),
            throughput_mbps: self.throughput_bytes_per_s() * 8.0 / 1e6,
            dirty_rate_pps: self.dirty_rate_pps(),
            rate_limit_bps: self.rate_limit.map(|b| b.saturating_mul(8)),
            harvest_ms: ms(harvest),
            stop_and_copy,
            postcopy: false,
            decision,
            dirty_pages: self.dirty_pages,
            carried_pages: self.carried_pages,
            threshold_bytes: self.threshold_bytes,
            ..RoundReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn cfg(policy: Policy, bandwidth: Bandwidth) -> PolicyConfig {
        PolicyConfig {
            policy,
            bandwidth,
            page_size: PageSize::MIN,
            memory_bytes: 256 * MIB,
            downtime_limit: Duration::from_millis(300),
            switchover_bandwidth: None,
            max_time: Duration::from_secs(60),
            throttling: Default::default(),
        }
    }

    /// A one-second round sending `bytes` that left `dirty` pages dirty.
    fn round(i: u32, bytes: u64, dirty: u64) -> RoundFigures {
        RoundFigures {
            round: i,
            pages: bytes / PAGE,
            bytes,
            duration: Duration::from_secs(1),
            dirty_pages: dirty,
            ..RoundFigures::default()
        }
    }

    fn run(c: &PolicyConfig, rounds: &[RoundFigures]) -> Decision {
        decide(c, rounds, Duration::from_secs(1))
    }

    #[test]
    fn parses() {
        let parse = |s: &str| s.parse::<Policy>();
        assert_eq!(parse("xen"), Ok(Policy::Xen));
        assert_eq!(parse("qemu"), Ok(Policy::Qemu));
        assert_eq!(parse("threshold"), Ok(Policy::Threshold));
        assert_eq!(parse("fixed:5"), Ok(Policy::Fixed(5)));
        for p in [
            Policy::Xen,
            Policy::Qemu,
            Policy::Threshold,
            Policy::Fixed(5),
        ] {
            assert_eq!(parse(&p.to_string()), Ok(p));
        }
        assert_eq!(Policy::Fixed(5).to_string(), "fixed:5");
        assert_eq!(parse("fixed:0"), Err(PolicyError::NoRounds));
        assert!(matches!(parse("fixed:x"), Err(PolicyError::Rounds(_))));
        assert!(parse("vmware")
            .unwrap_err()
            .to_string()
            .contains("expected xen, qemu, threshold or fixed:N"));
    }

    #[test]
    fn figures() {
        let r = round(0, 100 * MIB, 256);
        assert_eq!(
            (r.throughput_bytes_per_s(), r.dirty_rate_pps()),
            ((100 * MIB) as f64, 256.0)
        );
        let z = RoundFigures {
            duration: Duration::ZERO,
            ..r
        };
        assert_eq!((z.throughput_bytes_per_s(), z.dirty_rate_pps()), (0.0, 0.0));
        assert_eq!(
            StopReason::DirtyRateAboveMax.as_str(),
            "dirty_rate_above_max"
        );
    }

    #[test]
    fn max_time_beats_everything() {
        let c = cfg(Policy::Fixed(1), Bandwidth::Unlimited);
        assert_eq!(
            decide(&c, &[round(0, MIB, 0)], c.max_time),
            Decision::Stop(StopReason::MaxTime)
        );
        assert_eq!(
            run(&c, &[round(0, MIB, 0)]),
            Decision::Stop(StopReason::FixedRounds)
        );
    }

    #[test]
    fn fixed_counts_rounds_only() {
        let c = cfg(
            Policy::Fixed(3),
            Bandwidth::Dynamic {
                min: 1,
                max: 2,
                inc: 1,
            },
        );
        let rs: Vec<_> = (0..3).map(|i| round(i, MIB, 10)).collect();
        assert_eq!(run(&c, &rs[..2]), Decision::Continue); // few dirty, dirty rate > max: ignored
        assert_eq!(run(&c, &rs), Decision::Stop(StopReason::FixedRounds));
    }

    #[test]
    fn xen_rules() {
        let c = cfg(Policy::Xen, Bandwidth::Unlimited);
        // xc_domain_save: fewer than 50 pages *sent* in the round just done
        // (sent_this_iter), however many are dirty after it.
        assert_eq!(
            run(&c, &[round(0, 49 * PAGE, 1000)]),
            Decision::Stop(StopReason::FewDirtyPages)
        );
        assert_eq!(run(&c, &[round(0, 50 * PAGE, 1000)]), Decision::Continue);
        assert_eq!(run(&c, &[round(0, MIB, 0)]), Decision::Continue);
        // DEF_MAX_ITERS 29: the 29th live round is the last; the paused one
        // makes 30.
        let rs: Vec<_> = (0..29).map(|i| round(i, MIB, 1000)).collect();
        assert_eq!(run(&c, &rs[..28]), Decision::Continue);
        assert_eq!(run(&c, &rs), Decision::Stop(StopReason::RoundLimit));
        let big = [
            round(0, 256 * MIB, 1000),
            round(1, 256 * MIB, 1000),
            round(2, 256 * MIB, 1000),
        ];
        assert_eq!(run(&c, &big), Decision::Continue); // exactly 3x is not more
        let more = [
            big[0].clone(),
            big[1].clone(),
            round(2, 256 * MIB + PAGE, 1000), // one page more than 3x
        ];
        assert_eq!(run(&c, &more), Decision::Stop(StopReason::SentLimit));
    }

    #[test]
    fn xen_rate_at_max() {
        let bw = Bandwidth::Dynamic {
            min: MIB,
            max: 100 * MIB,
            inc: MIB,
        };
        let c = cfg(Policy::Xen, bw);
        let at = |i, bytes, limit| RoundFigures {
            rate_limit: Some(limit),
            ..round(i, bytes, 1000)
        };
        let stop = Decision::Stop(StopReason::RateAtMax);
        assert_eq!(run(&c, &[at(0, 10 * MIB, 100 * MIB)]), Decision::Continue); // needs 2 rounds
        assert_eq!(
            run(&c, &[at(0, 10 * MIB, MIB), at(1, 20 * MIB, 100 * MIB)]),
            stop
        );
        assert_eq!(
            run(&c, &[at(0, 20 * MIB, MIB), at(1, 10 * MIB, 100 * MIB)]),
            Decision::Continue
        );
        assert_eq!(
            run(&c, &[at(0, 10 * MIB, MIB), at(1, 20 * MIB, 50 * MIB)]),
            Decision::Continue
        );
        // Same figures with a static limit: not a dynamic rule.
        let s = cfg(
            Policy::Xen,
            Bandwidth::Static {
                bytes_per_s: 100 * MIB,
            },
        );
        assert_eq!(
            run(&s, &[at(0, 10 * MIB, MIB), at(1, 20 * MIB, 100 * MIB)]),
            Decision::Continue
        );
    }

    #[test]
    fn qemu_completes_below_the_threshold_at_the_sync() {
        let c = cfg(Policy::Qemu, Bandwidth::Unlimited);
        let synced = |pending, threshold| RoundFigures {
            carried_pages: 10,
            pending: Some(pending),
            threshold_bytes: threshold,
            ..round(3, MIB, 5)
        };
        let stop = Decision::Stop(StopReason::DowntimeLimit);
        // The exact pending bytes, not the pages dirtied, weigh.
        assert_eq!(run(&c, &[synced(100, Some(100 * PAGE + 1))]), stop);
        assert_eq!(
            run(&c, &[synced(100, Some(100 * PAGE))]),
            Decision::Continue
        );
        assert_eq!(run(&c, &[synced(100, None)]), Decision::Continue);
        assert_eq!(run(&c, &[synced(0, None)]), stop);
        // Whatever the expected downtime at the round's own throughput.
        let slow = RoundFigures {
            duration: Duration::from_secs(100),
            ..synced(100, Some(1 << 30))
        };
        assert_eq!(run(&c, &[slow]), stop);
    }

    #[test]
    fn qemu_switches_over_unthrottled_and_others_at_the_highest_rate() {
        let bw = Bandwidth::Static { bytes_per_s: MIB };
        assert_eq!(Precopy::new(cfg(Policy::Qemu, bw)).final_limit(), None);
        assert_eq!(
            Precopy::new(cfg(Policy::Threshold, bw)).final_limit(),
            Some(MIB)
        );
        assert_eq!(Precopy::new(cfg(Policy::Xen, bw)).final_limit(), Some(MIB));
    }

    #[test]
    fn threshold_downtime() {
        let c = cfg(Policy::Threshold, Bandwidth::Unlimited);
        let ten = round(0, 100 * MIB, 10 * MIB / PAGE);
        assert_eq!(
            expected_downtime(&c, &ten),
            Some(Duration::from_millis(100))
        );
        assert_eq!(run(&c, &[ten]), Decision::Stop(StopReason::DowntimeLimit));
        assert_eq!(
            run(&c, &[round(0, 100 * MIB, 60 * MIB / PAGE)]),
            Decision::Continue
        );
        // No bandwidth measured: no estimate, but zero dirty pages converge anyway.
        let idle = RoundFigures {
            duration: Duration::ZERO,
            ..round(0, 0, 0)
        };
        assert_eq!(expected_downtime(&c, &idle), None);
        assert_eq!(run(&c, &[idle]), Decision::Stop(StopReason::DowntimeLimit));
        let rs: Vec<_> = (0..100)
            .map(|i| round(i, 100 * MIB, 60 * MIB / PAGE))
            .collect();
        assert_eq!(run(&c, &rs), Decision::Continue); // no round cap
    }

    #[test]
    fn dynamic_dirty_rate_above_max_stops() {
        let bw = Bandwidth::Dynamic {
            min: MIB,
            max: 50 * MIB,
            inc: MIB,
        };
        // 60 MiB/s dirtied: above max. 10 MiB/s: fine (and would satisfy threshold).
        let fast = round(1, 100 * MIB, 60 * MIB / PAGE);
        let slow = round(1, 100 * MIB, 10 * MIB / PAGE);
        for p in [Policy::Xen, Policy::Qemu, Policy::Threshold] {
            assert_eq!(
                run(&cfg(p, bw), std::slice::from_ref(&fast)),
                Decision::Stop(StopReason::DirtyRateAboveMax)
            );
        }
        assert_eq!(
            run(&cfg(Policy::Xen, bw), std::slice::from_ref(&slow)),
            Decision::Continue
        );
        assert_eq!(
            run(&cfg(Policy::Threshold, bw), &[slow]),
            Decision::Stop(StopReason::DowntimeLimit)
        );
        // Static bandwidth never triggers it.
        let s = Bandwidth::Static { bytes_per_s: MIB };
        assert_eq!(run(&cfg(Policy::Xen, s), &[fast]), Decision::Continue);
    }
}
