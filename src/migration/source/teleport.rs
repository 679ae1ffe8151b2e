//! The sender's side of page-cache teleportation
//! ([`crate::migration::teleport`]): offer the backing file (its size and
//! a digest of sampled blocks), choose the share R of clean cache pages,
//! send their mapping at the start of round 0 instead of their bytes, count
//! the ones the guest writes afterwards (they go by network as dirty pages
//! do), and wait for the destination's storage before the pause.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::streams::{proto, proto_waited};
use super::SendError;
use crate::guest::cache::CacheMap;
use crate::guest::dirty::DirtySet;
use crate::guest::memory::GuestMemory;
use crate::migration::teleport::{
    choose_share, Disk, Share, TeleportConfig, TeleportError, DIGEST_SAMPLES,
};
use crate::report::{ms, TeleportStats};
use crate::util::netio::IO_TIMEOUT;
use crate::util::page::PageSize;
use crate::wire::protocol::{
    self, MapEntry, Message, ProtocolError, TeleportAck, TeleportDone, TeleportMap, TeleportOffer,
    MAX_MAP_ENTRIES, MAX_MAP_RUN,
};
use crate::wire::transport::Conn;

/// Blocks compared at once when looking for clean cache pages.
const COMPARE_BATCH: u64 = 256;
/// Storage is given at least 1 MB/s before the sender stops waiting for it.
const SLOWEST_STORAGE: f64 = 1e6;

/// Teleportation under way at the sender.
pub(super) struct Teleport {
    share: Share,
    map: CacheMap,
    /// The destination's measured read rate (None: it refused).
    storage_rate: Option<u64>,
    /// Clean cache pages as (block, page), in block order.
    candidates: Vec<(u64, u64)>,
    /// Pages whose mapping went out and that the network has not sent since.
    sent: DirtySet,
    pub(super) stats: TeleportStats,
    page_size: PageSize,
    pub(super) file: std::path::PathBuf,
}

impl Teleport {
    /// Offer the destination our backing file; a refusal is no error:
    /// every page then goes over the network, and the report says why.
    pub(super) fn offer(
        cfg: &TeleportConfig,
        map: CacheMap,
        sock: &mut Conn,
        page_size: PageSize,
        pages: u64,
    ) -> Result<Teleport, SendError> {
        let blocks = map.blocks_needed();
        let digest = Disk::open(&cfg.file, page_size)?.sample_digest(blocks)?;
        let offer = Message::TeleportOffer(TeleportOffer {
            blocks,
            block_size: page_size.as_u32(),
            samples: u32::try_from(DIGEST_SAMPLES.min(blocks)).unwrap_or(u32::MAX),
            digest,
        });
        let ctx = "offering page-cache teleportation";
        protocol::write_message(sock, &offer).map_err(proto(ctx))?;
        let ack: TeleportAck = protocol::expect_message(sock, None).map_err(proto(ctx))?;
        let mut stats = TeleportStats::default();
        let storage_rate = match ack.accepted {
            true => Some(ack.storage_rate),
            false => {
                stats.teleport_refused = Some(ack.reason);
                None
            }
        };
        Ok(Teleport {
            share: cfg.share,
            map,
            storage_rate,
            candidates: Vec::new(),
            sent: DirtySet::new(pages),
            stats,
            page_size,
            file: cfg.file.clone(),
        })
    }

    pub(super) fn accepted(&self) -> bool {
        self.storage_rate.is_some()
    }

    /// The cache pages not written since the guest read them in: those
    /// that still hold their block's bytes. (A guest kernel knows which of
    /// its page cache is clean; the emulator's guest does not keep that
    /// list, so the sender compares.) Call it just after a harvest: a page
    /// written after that harvest shows in the next one and goes by
    /// network, and one written before it no longer matches its block.
    pub(super) fn choose_candidates(
        &mut self,
        mem: &GuestMemory,
        file: &Path,
    ) -> Result<(), SendError> {
        let read = |source| TeleportError::Read {
            path: file.into(),
            block: 0,
            source,
        };
        let f = std::fs::File::open(file).map_err(read)?;
        let ps = mem.page_size();
        let mut buf = vec![0u8; ps.as_usize() * COMPARE_BATCH as usize];
        let mut c: Vec<(u64, u64)> = Vec::new();
        for r in self.map.runs() {
            let mut done = 0;
            while done < r.count {
                let n = (r.count - done).min(COMPARE_BATCH);
                let (page, block) = (r.first_page + done, r.first_block + done);
                let b = &mut buf[..ps.bytes(n) as usize];
                f.read_exact_at(b, ps.bytes(block)).map_err(read)?;
                // SAFETY: the guest may be writing these pages: a torn read
                // only makes a page look written, which sends it by network.
                let m = unsafe { mem.pages(page, n) };
                let pairs = b
                    .chunks_exact(ps.as_usize())
                    .zip(m.chunks_exact(ps.as_usize()));
                for (i, (disk, ram)) in pairs.enumerate() {
                    if disk == ram {
                        c.push((block + i as u64, page + i as u64));
                    }
                }
                done += n;
            }
        }
        c.sort_unstable();
        self.stats.teleport_candidates = c.len() as u64;
        self.candidates = c;
        Ok(())
    }

    /// `auto`: the pages sent first to measure the network, a quarter of
    /// those that are not candidates (None for a fixed share).
    pub(super) fn probe_slice(&self, todo: &DirtySet) -> Option<DirtySet> {
        if self.share != Share::Auto {
            return None;
        }
        let mut cache = DirtySet::new(todo.pages());
        self.candidates.iter().for_each(|&(_, p)| cache.set(p));
        let others: Vec<u64> = todo
            .runs(u64::MAX)
            .flat_map(|(f, n)| f..f + n)
            .filter(|&p| !cache.contains(p))
            .collect();
        let mut slice = DirtySet::new(todo.pages());
        others[..others.len() / 4]
            .iter()
            .for_each(|&p| slice.set(p));
        Some(slice)
    }

    /// Choose R (`net_rate`: what the probe slice measured, for `auto`;
    /// `dirty_pps`: the guest's write rate, whose pages the network sends
    /// again meanwhile), take the chosen pages out of `todo` and send their
    /// mapping. Returns the bytes written.
    pub(super) fn send_map(
        &mut self,
        sock: &mut Conn,
        net_rate: Option<f64>,
        dirty_pps: f64,
        todo: &mut DirtySet,
    ) -> Result<u64, SendError> {
        let c = self.candidates.len() as u64;
        let r = match (self.share, net_rate, self.storage_rate) {
            (Share::Fixed(r), ..) => r,
            (Share::Auto, Some(net), Some(sto)) => {
                let others = todo.count().saturating_sub(c);
                self.stats.network_rate_bps = Some(net as u64);
                self.stats.storage_rate_bps = Some(sto);
                // The network's rate left for this work: the guest's
                // writes come back as dirty pages while it runs.
                let left = (net - dirty_pps * self.page_size.as_u64() as f64).max(net / 10.0);
                choose_share(left, sto as f64, others, c)
            }
            (Share::Auto, ..) => 0.0,
        };
        self.stats.teleport_share = r;
        // f64 -> u64: a share of a page count.
        let n = ((r * c as f64).round() as u64).min(c) as usize;
        let mut entries: Vec<MapEntry> = Vec::new();
        for &(block, page) in &self.candidates[..n] {
            todo.remove(page);
            self.sent.set(page);
            match entries.last_mut() {
                Some(e)
                    if e.first_page + u64::from(e.count) == page
                        && e.first_block + u64::from(e.count) == block
                        && e.count < MAX_MAP_RUN =>
                {
                    e.count += 1
                }
                _ => entries.push(MapEntry {
                    first_page: page,
                    first_block: block,
                    count: 1,
                }),
            }
        }
        let mut bytes = 0;
        for batch in entries.chunks(MAX_MAP_ENTRIES) {
            let m = Message::TeleportMap(TeleportMap(batch.to_vec()));
            bytes +=
                protocol::write_message(sock, &m).map_err(proto("sending the teleport map"))?;
        }
        Ok(bytes as u64)
    }

    /// Pages about to go by network: those whose mapping was sent fell
    /// back (the guest wrote them), and the network copy wins.
    pub(super) fn network_sends(&mut self, todo: &DirtySet) {
        for (first, n) in todo.runs(u64::MAX) {
            for p in first..first + n {
                if self.sent.contains(p) {
                    self.sent.remove(p);
                    self.stats.teleport_fallback_pages += 1;
                }
            }
        }
    }

    /// Before the pause: wait until the destination's storage is done.
    pub(super) fn sync(&mut self, sock: &mut Conn) -> Result<(), SendError> {
        let ctx = "waiting for the destination's storage";
        protocol::write_message(sock, &Message::TeleportSync(protocol::TeleportSync))
            .map_err(proto(ctx))?;
        let left = self.page_size.bytes(self.sent.count()) as f64;
        let wait = IO_TIMEOUT + Duration::from_secs_f64(left / SLOWEST_STORAGE);
        let io = |e| proto(ctx)(ProtocolError::Io(e));
        sock.set_read_timeout(Some(wait)).map_err(io)?;
        let t = Instant::now();
        let done: TeleportDone =
            protocol::expect_message(sock, None).map_err(proto_waited(ctx, wait))?;
        sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let s = &mut self.stats;
        s.teleported_pages = done.pages;
        s.storage_bytes = done.bytes;
        s.storage_busy_ms = ms(Duration::from_nanos(done.busy_ns));
        s.sync_wait_ms = ms(t.elapsed());
        Ok(())
    }
}
