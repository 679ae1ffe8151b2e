//! The destination's storage channel: it answers the sender's offer
//! (same file? how fast?), reads the blocks of each `TeleportMap` on a
//! thread of its own while pages stream, and reports when the sender asks
//! (`TeleportSync`) or before the guest runs, whichever comes first. The
//! ordering rule is [`crate::migration::teleport`]'s.

use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::Sender;

use super::ReceiveError;
use crate::guest::memory::GuestMemory;
use crate::migration::teleport::{
    Claims, Disk, StorageConfig, StorageFigures, TeleportError, DIGEST_SAMPLES,
};
use crate::util::page::PageSize;
use crate::wire::datapath::Landed;
use crate::wire::protocol::{
    Kind, Limits, MapEntry, Message, ProtocolError, TeleportAck, TeleportDone, TeleportOffer,
};
use crate::wire::ratelimit::RateLimiter;

/// Why this receiver refuses to teleport (the sender is told).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("this receiver has no --teleport FILE")]
    NoFile,
    #[error("teleportation works over one stream (--streams 1)")]
    Streams,
    #[error(transparent)]
    Disk(#[from] TeleportError),
    #[error("its backing file {} differs from the sender's (digest of {samples} sampled blocks)", .file.display())]
    Differs {
        file: std::path::PathBuf,
        samples: u64,
    },
}

type Reader<'s> = ScopedJoinHandle<'s, Result<StorageFigures, TeleportError>>;

/// The storage channel of one migration.
pub(super) struct Storage<'s, 'e> {
    cfg: Option<&'e StorageConfig>,
    claims: Option<&'e Claims>,
    mem: &'e GuestMemory,
    landed: &'e Landed,
    /// Opened and checked when the offer was accepted.
    disk: Option<Disk>,
    limiter: RateLimiter,
    queue: Option<Sender<Vec<MapEntry>>>,
    reader: Option<Reader<'s>>,
    pub(super) refused: Option<String>,
    pub(super) figures: Option<StorageFigures>,
}

impl<'s, 'e: 's> Storage<'s, 'e> {
    pub(super) fn new(
        cfg: Option<&'e StorageConfig>,
        claims: Option<&'e Claims>,
        mem: &'e GuestMemory,
        landed: &'e Landed,
    ) -> Self {
        Storage {
            cfg,
            claims,
            mem,
            landed,
            disk: None,
            limiter: RateLimiter::new(cfg.and_then(|c| c.rate)),
            queue: None,
            reader: None,
            refused: None,
            figures: None,
        }
    }

    /// The network is about to write these pages.
    pub(super) fn network_writes(&self, first: u64, count: u32) {
        if let Some(c) = self.claims {
            c.claim_for_network(first, u64::from(count));
        }
    }

    /// Answer the sender's offer: accept with the measured read rate, or
    /// refuse saying why (the sender then sends every page by network).
    pub(super) fn offer(&mut self, o: &TeleportOffer, limits: &Limits) -> Message {
        let answer = self.check(o, limits);
        let (accepted, rate, reason) = match answer {
            Ok(rate) => (true, rate, String::new()),
            Err(e) => {
                let why = crate::util::error::error_chain(&e);
                self.disk = None;
                self.refused = Some(why.clone());
                (false, 0, why)
            }
        };
        Message::TeleportAck(TeleportAck {
            accepted,
            storage_rate: rate,
            reason,
        })
    }

    fn check(&mut self, o: &TeleportOffer, limits: &Limits) -> Result<u64, Refusal> {
        let cfg = self.cfg.ok_or(Refusal::NoFile)?;
        if limits.streams > 1 {
            return Err(Refusal::Streams);
        }
        let mut disk = Disk::open(&cfg.file, PageSize::host())?;
        let digest = disk.sample_digest(o.blocks)?;
        let samples = DIGEST_SAMPLES.min(o.blocks);
        if digest != o.digest || u64::from(o.samples) != samples {
            let file = cfg.file.clone();
            return Err(Refusal::Differs { file, samples });
        }
        let rate = disk.probe_rate(&self.limiter, o.blocks)?;
        self.disk = Some(disk);
        Ok(rate)
    }

    /// A batch of the mapping: mark its pages pending and queue it for the
    /// reader (started with the first batch).
    pub(super) fn map(
        &mut self,
        scope: &'s Scope<'s, '_>,
        entries: Vec<MapEntry>,
    ) -> Result<(), ReceiveError> {
        let claims = match (self.claims, self.reader.is_some() || self.disk.is_some()) {
            (Some(c), true) => c,
            _ => {
                return Err(ReceiveError::Protocol(crate::wire::protocol::InContext {
                    context: "round 0".into(),
                    source: ProtocolError::BadField {
                        kind: Kind::TeleportMap,
                        detail: "a mapping without an accepted offer".into(),
                    },
                }))
            }
        };
        for e in &entries {
            (e.first_page..e.first_page + u64::from(e.count)).for_each(|p| claims.mark_pending(p));
        }
        if let Some(mut disk) = self.disk.take() {
            let (tx, rx) = crossbeam_channel::unbounded::<Vec<MapEntry>>();
            let (mem, landed, limiter) = (self.mem, self.landed, self.limiter.clone());
            self.queue = Some(tx);
            self.reader = Some(scope.spawn(move || {
                let mut f = StorageFigures::default();
                for batch in rx {
                    crate::migration::teleport::read_entries(
                        &mut disk, &batch, mem, landed, claims, &limiter, &mut f,
                    )?;
                }
                Ok(f)
            }));
        }
        if let Some(q) = &self.queue {
            // A reader that failed has dropped its end: finish says why.
            let _ = q.send(entries);
        }
        Ok(())
    }

    /// Wait for the reader to finish everything queued (none started: no
    /// figures). Called on `TeleportSync` and before the guest runs.
    pub(super) fn finish(&mut self) -> Result<Option<TeleportDone>, ReceiveError> {
        self.queue = None;
        let Some(reader) = self.reader.take() else {
            return Ok(None);
        };
        let f = reader
            .join()
            .map_err(|_| ReceiveError::Storage("the storage reader panicked".into()))?
            .map_err(|e| ReceiveError::Storage(crate::util::error::error_chain(&e)))?;
        self.figures = Some(f);
        Ok(Some(TeleportDone {
            pages: f.pages,
            skipped: f.skipped,
            bytes: f.bytes,
            busy_ns: u64::try_from(f.busy.as_nanos()).unwrap_or(u64::MAX),
        }))
    }
}
