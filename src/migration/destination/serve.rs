//! `receive --serve`: migrations taken concurrently, one destination guest
//! each, until cancelled.
//!
//! Threads rather than tokio: a migration's receiver is blocking code (a
//! control loop, a thread per data connection, the guest's futex), so a
//! thread per migration reuses it as it is, and a destination host takes a
//! handful of migrations at once, not thousands.
//!
//! Connections are routed by connection: each one the serving loop accepts
//! opens a migration of its own. A migration with data connections
//! (`--streams N`, post-copy's request connection) holds the listener
//! while it accepts them and checks each one's session id; the loop
//! accepts nothing meanwhile, so they cannot be taken for new migrations.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Prepared, ReceiveError, ReceiveReport, Receiving};
use crate::util::cancel::Cancel;
use crate::wire::transport::Security;

/// How long the serving loop waits in poll(2) for a connection before it
/// looks at the cancel again (it cannot block in `accept` while a
/// migration may need the listener, so it waits for one to be pending).
const POLL: Duration = Duration::from_millis(100);

/// Wait up to `timeout` for a connection to be pending on `listener`.
fn wait_pending(listener: &TcpListener, timeout: Duration) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::Error::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a service did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub migrations: u64,
    pub failed: u64,
}

/// Take migrations on `listener` until `cancel`, each in a thread of its
/// own into memory from `prepare`; `done` gets each one's report and
/// outcome as it ends (from that migration's thread). Returns once every
/// migration under way has ended.
pub fn serve(
    listener: &TcpListener,
    prepare: &(dyn Fn() -> Result<Prepared, ReceiveError> + Sync),
    cancel: &Cancel,
    security: &Security,
    done: &(dyn Fn(u64, ReceiveReport, Result<(), ReceiveError>) + Sync),
) -> Result<Served, ReceiveError> {
    let gate = Arc::new(Mutex::new(()));
    let listen_err = |source| ReceiveError::Listen {
        addr: listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        source,
    };
    let served = Mutex::new(Served::default());
    let mut prepared = Some(prepare()?);
    std::thread::scope(|scope| {
        let mut n = 0u64;
        while !cancel.is_cancelled() {
            let accepted = {
                let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
                listener.set_nonblocking(true).map_err(listen_err)?;
                listener.accept()
            };
            let (sock, peer) = match accepted {
                Ok(a) => a,
                // Nothing pending, or a migration took it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_pending(listener, POLL).map_err(listen_err)?;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(listen_err(e)),
            };
            sock.set_nonblocking(false).map_err(listen_err)?;
            n += 1;
            let mine = match prepared.take() {
                Some(p) => p,
                None => prepare()?,
            };
            let (gate, served) = (Arc::clone(&gate), &served);
            scope.spawn(move || {
                let mut rx = Receiving::new(mine, cancel, security, Some(gate));
                let result = rx.run_accepted(sock, peer, listener);
                let (mut report, result) = rx.finish(result);
                report.served = Some(n);
                {
                    let mut s = served.lock().unwrap_or_else(|p| p.into_inner());
                    s.migrations += 1;
                    s.failed += u64::from(result.is_err());
                }
                done(n, report, result);
            });
            // The next migration's memory, made while nobody waits for it.
            prepared = Some(prepare()?);
        }
        Ok(())
    })?;
    let s = *served.lock().unwrap_or_else(|p| p.into_inner());
    Ok(s)
}
