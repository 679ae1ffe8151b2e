//! `livemig migrate`: both ends on this machine over loopback, the receiver
//! on a thread of this process, each guest in its own process.

use crate::migration::destination::{self, ReceiveError};
use crate::migration::sampler::Observe;
use crate::migration::source::{self, SendError, SenderConfig, Source};
use crate::migration::teleport::StorageConfig;
use crate::report::{Report, RoundReport, Status};

/// Errors of a local migration: whichever end saw the cause.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("receiver")]
    Receive(#[from] ReceiveError),
    #[error(transparent)]
    Memory(#[from] crate::guest::memory::MemoryError),
}

/// The destination's options in a local migration.
#[derive(Clone, Debug)]
pub struct Destination {
    /// Allocate its memory before the migration starts (see [`destination`]).
    pub prealloc: bool,
    /// Post-copy: pages asked for after each faulted one.
    pub prepage: u32,
    /// How long the timeline watches the guest after it resumed here.
    pub observe: Observe,
    /// Page-cache teleportation: the destination's path to the shared
    /// data (None: the sender's `--teleport FILE`, the same file on one
    /// machine) and its read rate (`--storage-rate`).
    pub teleport_file: Option<std::path::PathBuf>,
    pub storage_rate: Option<u64>,
}

impl Default for Destination {
    fn default() -> Self {
        Self {
            prealloc: true,
            prepage: 0,
            observe: Observe::UntilRecovered,
            teleport_file: None,
            storage_rate: None,
        }
    }
}

/// Run a local migration. The report is filled in as far as it got.
pub fn run(
    cfg: &SenderConfig,
    dest: Destination,
    on_round: &mut dyn FnMut(&RoundReport),
) -> (Report, Result<(), MigrateError>) {
    let failed = |e: MigrateError| {
        let report = Report {
            error: Some(crate::util::error::error_chain(&e)),
            ..cfg.report()
        };
        (report, Err(e))
    };
    // Both ends' guest memory lives on this machine.
    if let Err(e) = crate::guest::memory::check_fits(
        &format!(
            "a guest of {} (a local migration holds it twice)",
            crate::util::units::fmt_bytes(cfg.memory_bytes)
        ),
        cfg.memory_bytes.saturating_mul(2),
    ) {
        return failed(e.into());
    }
    let listener = match destination::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => return failed(e.into()),
    };
    let addr = listener.local_addr().expect("bound").to_string();
    let started = std::time::Instant::now();
    let mut src = match Source::start(cfg.tracker, cfg.memory_bytes, &cfg.fresh()) {
        Ok(s) => s,
        Err(e) => return failed(e.into()),
    };
    let source_start = crate::report::ms(started.elapsed());
    // Post-copy discards what it has not received: preallocating all of
    // it first would only add the discard to the downtime.
    let prealloc = dest.prealloc && cfg.mode != crate::migration::phases::Mode::Postcopy;
    let mut prepared =
        match destination::Prepared::new(Some(cfg.memory_bytes), prealloc, dest.prepage) {
            Ok(p) => p,
            Err(e) => return failed(e.into()),
        };
    prepared.storage = cfg.teleport.as_ref().map(|t| StorageConfig {
        file: dest.teleport_file.clone().unwrap_or_else(|| t.file.clone()),
        rate: dest.storage_rate.or(t.storage_rate),
    });
    // The timeline follows the guest to the destination.
    let sampler = src.sampler(cfg);
    let prepared = match &sampler {
        Some(s) => prepared.observed_by(s.probe().clone()),
        None => prepared,
    };
    // The receiver hears of a cancel from the sender, as a remote one does.
    let security = cfg.security.clone();
    let rx = std::thread::spawn(move || {
        destination::receive(
            &listener,
            prepared,
            &crate::util::cancel::Cancel::new(),
            &security,
        )
    });
    let (mut report, sent) =
        source::migrate_sampled(cfg, &mut src, &addr, on_round, sampler.as_ref());
    if let Some(s) = sampler {
        if sent.is_ok() {
            s.observe(dest.observe, report.guest_dirty_rate_pps);
        }
        // Lets the destination go on.
        s.finish_into(&mut report);
    }
    drop(src);
    if sent.is_err() {
        // If the sender failed before connecting, the receiver still waits in
        // accept: a connection that closes at once ends it.
        let _ = std::net::TcpStream::connect(&addr);
    }
    let (rr, received) = rx.join().expect("receiver thread panicked");
    report.destination_status = Some(rr.status);
    report.source_start_ms = Some(source_start);
    let result = match (sent, received) {
        (Ok(()), Ok(())) => {
            report.destination_guest_rate_pps = Some(rr.destination_guest_rate_pps);
            report.receiver_prealloc_ms = prealloc.then_some(rr.prealloc_ms);
            report.destination_stream_pages = rr.stream_pages;
            // What only the destination sees of post-copy.
            if let Some(p) = rr.postcopy {
                let r = &mut report.postcopy;
                r.postcopy_faults = p.postcopy_faults;
                // Placed first, so pulled + pushed = pages fetched.
                r.pages_pulled = p.pages_pulled;
                r.pages_pushed = p.pages_pushed;
                r.fault_latency_us = p.fault_latency_us;
                r.postcopy_populated_ms = p.postcopy_populated_ms;
                r.postcopy_discard_ms = p.postcopy_discard_ms;
                r.guest_rate_postcopy_pps = p.guest_rate_postcopy_pps;
            }
            return (report, Ok(()));
        }
        // The receiver's own error names the cause better than the sender's view of it.
        (Err(SendError::Refused(_) | SendError::Protocol(_)), Err(re)) => {
            Err(MigrateError::Receive(re))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(()), Err(re)) => Err(re.into()),
    };
    if let Err(e) = &result {
        if report.status != Status::Cancelled {
            report.status = Status::Failed;
        }
        report.error = Some(crate::util::error::error_chain(e));
    }
    (report, result)
}
