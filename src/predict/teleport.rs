//! The second channel in predictions: page-cache teleportation
//! ([`crate::migration::teleport`]). The destination reads R of the clean
//! cache pages from storage at the storage rate, starting with round 0; the
//! network's round 0 carries the rest; the switch-over waits until storage
//! is done, as the real sender does. `auto` is resolved with the same
//! [`choose_share`] as the real sender, from the link's and storage's rates,
//! storage starting once a quarter of the other pages went (the real
//! sender's measuring slice).

use std::time::Duration;

use crate::migration::source::SenderConfig;
use crate::migration::teleport::{choose_share, Share, PROBE_BYTES};
use crate::report::{ms, TeleportStats};
use crate::util::page::PageSize;
use crate::util::units::PageRate;

/// Storage rate assumed when none is given: a fast local disk.
const DEFAULT_STORAGE: f64 = 1e9;

/// What storage carries in a predicted migration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SecondChannel {
    pub share: f64,
    /// Clean cache pages at the start, and the ones teleported.
    pub candidates: u64,
    pub pages: u64,
    /// From the start of round 0 until storage is done.
    pub done_after: Duration,
    pub busy: Duration,
    /// What the offer adds to the setup: the destination's probe read.
    pub setup: Duration,
}

impl SecondChannel {
    /// The channel migration `m` describes over a link of `link` bytes/s
    /// (None: no teleportation).
    pub(crate) fn plan(m: &SenderConfig, page_size: PageSize, link: f64) -> Option<SecondChannel> {
        let (t, cache) = (m.teleport.as_ref()?, m.workload.content.cache?);
        let ps = page_size.as_u64() as f64;
        let pages = page_size.pages(m.memory_bytes);
        // Pages written during the warm-up are no longer restorable
        // (uniformly spread writes: e^(-writes/pages) stay clean).
        let writes = match m.workload.rate {
            PageRate::PerSec(r) if !m.workload.is_idle() => r * m.warmup.as_secs_f64(),
            _ => 0.0,
        };
        let clean = (-writes / pages as f64).exp();
        // f64 -> u64: page counts.
        let candidates = (cache.share * pages as f64 * clean).round() as u64;
        let storage = t.storage_rate.map_or(DEFAULT_STORAGE, |r| r as f64);
        let net = m
            .bandwidth
            .initial_limit()
            .map_or(link, |l| (l as f64).min(link));
        let others = pages - candidates.min(pages);
        let (share, start) = match t.share {
            Share::Fixed(r) => (r, 0.0),
            Share::Auto => {
                let slice = others / 4;
                let left = (net - writes / m.warmup.as_secs_f64().max(1e-9) * ps).max(net / 10.0);
                let r = choose_share(left, storage, others - slice, candidates);
                (r, slice as f64 * ps / net)
            }
        };
        let teleported = (share * candidates as f64).round() as u64;
        let busy = Duration::from_secs_f64(teleported as f64 * ps / storage);
        Some(SecondChannel {
            share,
            candidates,
            pages: teleported,
            done_after: Duration::from_secs_f64(start) + busy,
            busy,
            setup: Duration::from_secs_f64(
                PROBE_BYTES.min(page_size.bytes(candidates)) as f64 / storage,
            ),
        })
    }

    /// The report's figures; `network_busy`: the rounds' send time.
    pub(crate) fn stats(&self, page_size: PageSize, network_busy: Duration) -> TeleportStats {
        TeleportStats {
            teleport_share: self.share,
            teleported_pages: self.pages,
            storage_bytes: page_size.bytes(self.pages),
            storage_busy_ms: ms(self.busy),
            network_busy_ms: ms(network_busy),
            teleport_candidates: self.candidates,
            ..TeleportStats::default()
        }
    }
}
