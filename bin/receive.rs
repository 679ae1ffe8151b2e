//! `livemig receive`: accept a migration (or, with `--serve`, one after
//! another until stopped), resume its guest, verify it.

use std::io::Write;

use anyhow::{Context, Result};

use livemig::migration::destination::{self as receiver, ReceiveReport};
use livemig::report::Status;
use livemig::util::cancel::Cancel;

use crate::cli::ReceiveOpts;
use crate::{EXIT, EXIT_PEER_CANCELLED};

pub fn run(opts: ReceiveOpts) -> Result<()> {
    let security = opts.security.config("listen on", &opts.listen)?;
    let cancel = Cancel::on_signals()?;
    let listener = receiver::bind(&opts.listen)?;
    let storage = opts.teleport.config()?;
    let prepare = || {
        receiver::Prepared::new(opts.mem.map(|m| m.0), !opts.no_prealloc, opts.prepage).map(
            |mut p| {
                p.storage = storage.clone();
                p
            },
        )
    };
    let addr = listener.local_addr()?;
    if opts.serve {
        return serve(&opts, &listener, &prepare, &cancel, &security);
    }
    let mut prepared = prepare()?;
    errln!("livemig: waiting for a migration on {addr}");
    let (mut served, mut failed) = (0u64, 0u64);
    loop {
        let (r, result) = receiver::receive(&listener, prepared, &cancel, &security);
        // Serving, a wait for a sender that a signal ended is no migration.
        let waiting = opts.serve && r.peer.is_empty();
        if let Some(path) = opts.json.as_ref().filter(|_| !waiting) {
            write_json(path, &r, opts.serve)?;
        }
        if let Some(summary) = r.summary() {
            out!("{summary}");
        }
        if !opts.serve {
            if r.status == Status::Cancelled {
                // Told by the sender: 3; cancelled here: as the signal says.
                let _ = EXIT.set(cancel.why().map_or(EXIT_PEER_CANCELLED, |w| w.exit_code()));
            }
            return Ok(result?);
        }
        // Serving: a signal here ends the service (a migration it cut short
        // counts as failed); anything else ends one migration, and the next
        // is awaited.
        if !waiting {
            served += 1;
        }
        if let (Err(e), false) = (result, waiting) {
            failed += 1;
            errln!("livemig: migration {served} from {} failed: {e:#}", r.peer);
        }
        if cancel.why().is_some() {
            outln!("served            {served} migrations, {failed} failed");
            return Ok(());
        }
        prepared = prepare()?;
        errln!("livemig: waiting for migration {} on {addr}", served + 1);
    }
}

/// `--serve`: migrations taken concurrently until SIGINT or SIGTERM, each
/// reported (and appended to `--json`) as it ends.
fn serve(
    opts: &ReceiveOpts,
    listener: &std::net::TcpListener,
    prepare: &(dyn Fn() -> Result<receiver::Prepared, receiver::ReceiveError> + Sync),
    cancel: &Cancel,
    security: &livemig::wire::transport::Security,
) -> Result<()> {
    let addr = listener.local_addr()?;
    errln!("livemig: waiting for a migration on {addr}");
    let json = std::sync::Mutex::new(());
    let done = |n: u64, r: ReceiveReport, result: Result<(), receiver::ReceiveError>| {
        if let Some(path) = &opts.json {
            let _one_at_a_time = json.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = write_json(path, &r, true) {
                errln!("livemig: {e:#}");
            }
        }
        if let Some(summary) = r.summary() {
            out!("{summary}");
        }
        match result {
            Ok(()) => errln!("livemig: migration {n} from {} completed", r.peer),
            Err(e) => errln!("livemig: migration {n} from {} failed: {e:#}", r.peer),
        }
    };
    let served = receiver::serve(listener, prepare, cancel, security, &done)?;
    outln!(
        "served            {} migrations, {} failed",
        served.migrations,
        served.failed
    );
    Ok(())
}

/// The report as JSON: alone in `path`, or (serving) appended as one line.
fn write_json(path: &std::path::Path, r: &ReceiveReport, append: bool) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    if !append {
        let f = std::fs::File::create(path).with_context(ctx)?;
        return Ok(serde_json::to_writer_pretty(f, r)?);
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(ctx)?;
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    f.write_all(&line).with_context(ctx)
}
