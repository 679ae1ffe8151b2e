//! The live view's gauge: after each pre-copy round, how far the dirty set
//! is from the size at which the convergence policy stops iterating, on a
//! log scale from the whole memory down to that threshold (each tenfold
//! shrink moves it the same distance, as rounds of a converging guest do).

use crate::migration::policy::{
    expected_downtime, Policy, PolicyConfig, RoundFigures, XEN_MIN_DIRTY_PAGES,
};

/// Cells of the gauge's bar.
pub const WIDTH: usize = 30;

/// The policy's threshold in pages after `last`, and how it says it: xen's
/// 50 pages; qemu's threshold at the round's last sync; what threshold's
/// downtime limit lets through at the last round's throughput; none for a
/// fixed number of rounds.
pub fn threshold(cfg: &PolicyConfig, last: &RoundFigures) -> Option<(u64, String)> {
    match cfg.policy {
        Policy::Xen => Some((
            XEN_MIN_DIRTY_PAGES,
            format!("xen stops under {XEN_MIN_DIRTY_PAGES} pages"),
        )),
        Policy::Qemu => {
            // The threshold the round's last sync was weighed against.
            let bytes = last.threshold_bytes?;
            Some((
                (bytes / cfg.page_size.as_u64()).max(1),
                format!(
                    "qemu stops when they fit {} ms at {:.0} Mbit/s",
                    cfg.downtime_limit.as_millis(),
                    bytes as f64 * 8.0 / 1e6 / cfg.downtime_limit.as_secs_f64()
                ),
            ))
        }
        Policy::Threshold => {
            let bw = last.throughput_bytes_per_s();
            if bw <= 0.0 || expected_downtime(cfg, last).is_none() {
                return None;
            }
            // f64 -> u64: a page count, far below 2^53.
            let pages =
                (cfg.downtime_limit.as_secs_f64() * bw / cfg.page_size.as_u64() as f64) as u64;
            Some((
                pages.max(1),
                format!(
                    "threshold stops when they fit {} ms at {:.0} Mbit/s",
                    cfg.downtime_limit.as_millis(),
                    bw * 8.0 / 1e6
                ),
            ))
        }
        Policy::Fixed(_) => None,
    }
}

/// One line: the dirty pages against the threshold, a bar filled as they
/// shrink from `total` pages down to it.
pub fn line(cfg: &PolicyConfig, last: &RoundFigures, total: u64) -> String {
    // Pages pending: with qemu's partial rounds, the dirty and the unsent.
    let dirty = last.pending.unwrap_or(last.dirty_pages);
    let Some((limit, why)) = threshold(cfg, last) else {
        return format!("{dirty:>9} pages dirty after round {}", last.round);
    };
    let fill = fraction(dirty, limit, total);
    // f64 -> usize: within 0..=WIDTH.
    let cells = (fill * WIDTH as f64).round() as usize;
    format!(
        "{dirty:>9} pages dirty [{}{}] {why}",
        "#".repeat(cells),
        "-".repeat(WIDTH - cells)
    )
}

/// How far `dirty` has come from `total` down to `limit`, 0..=1, on a log scale.
pub fn fraction(dirty: u64, limit: u64, total: u64) -> f64 {
    if dirty <= limit {
        return 1.0;
    }
    let (d, l, t) = (dirty as f64, limit.max(1) as f64, total.max(2) as f64);
    if t <= l {
        return 0.0;
    }
    ((t / d).ln() / (t / l).ln()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::page::PageSize;
    use crate::wire::ratelimit::Bandwidth;
    use std::time::Duration;

    fn cfg(policy: Policy) -> PolicyConfig {
        PolicyConfig {
            policy,
            bandwidth: Bandwidth::Unlimited,
            page_size: PageSize::new(4096).unwrap(),
            memory_bytes: 1 << 30,
            downtime_limit: Duration::from_millis(300),
            switchover_bandwidth: None,
            max_time: Duration::from_secs(60),
            throttling: Default::default(),
        }
    }

    fn round(dirty_pages: u64) -> RoundFigures {
        RoundFigures {
            round: 3,
            pages: 1000,
            // 100 MB/s: 300 ms lets 30 MB through, 7324 pages.
            bytes: 100_000_000,
            duration: Duration::from_secs(1),
            dirty_pages,
            rate_limit: None,
            carried_pages: 0,
            pending: None,
            threshold_bytes: None,
        }
    }

    #[test]
    fn the_gauge_fills_by_tenfolds_from_memory_down_to_the_threshold() {
        assert_eq!(fraction(100_000, 10, 100_000), 0.0);
        assert!((fraction(1000, 10, 100_000) - 0.5).abs() < 1e-12);
        assert_eq!(fraction(10, 10, 100_000), 1.0);
        assert_eq!(fraction(3, 10, 100_000), 1.0);
    }

    #[test]
    fn each_policy_names_its_threshold() {
        let xen = line(&cfg(Policy::Xen), &round(5000), 262_144);
        assert!(
            xen.contains("5000 pages dirty") && xen.contains("under 50 pages"),
            "{xen}"
        );
        assert_eq!(xen.matches('#').count() + xen.matches('-').count(), WIDTH);
        let (pages, why) = threshold(&cfg(Policy::Threshold), &round(5000)).unwrap();
        assert_eq!(pages, 7324);
        assert!(why.contains("300 ms at 800 Mbit/s"), "{why}");
        // qemu: the threshold its last sync was weighed against, 30 MB.
        let synced = RoundFigures {
            threshold_bytes: Some(30_000_000),
            ..round(5000)
        };
        let (pages, why) = threshold(&cfg(Policy::Qemu), &synced).unwrap();
        assert_eq!(pages, 7324);
        assert!(why.contains("300 ms at 800 Mbit/s"), "{why}");
        assert!(threshold(&cfg(Policy::Qemu), &round(5000)).is_none());
        let fixed = line(&cfg(Policy::Fixed(5)), &round(5000), 262_144);
        assert!(!fixed.contains('['), "{fixed}");
    }
}
