//! The destination's side of post-copy: take the resumed guest's
//! missing-page faults, serve them with the source's replies, and place the
//! source's background push until every page is present.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::{unexpected_frame, ReceiveError, Receiving};
use crate::guest::process::Guest;
use crate::wire::datapath::Landed;
use crate::wire::protocol::InContext;
use crate::wire::protocol::{
    self, Abort, Frame, Kind, Limits, Message, PageRun, ProtocolError, RoundEnd, RoundStart,
};
use crate::wire::transport::Conn;

impl Receiving {
    /// Take the post-copy guest's userfaultfd: its missing pages fault to us.
    pub(super) fn take_faults(
        &mut self,
        guest: &mut Guest,
        limits: &Limits,
        missing: &crate::guest::dirty::DirtySet,
    ) -> Result<crate::migration::postcopy::Destination, ReceiveError> {
        let pid = guest.pid();
        let Some(fd) = guest.control().wait_uffd(Duration::from_secs(5)) else {
            guest.check_alive()?;
            return Err(ReceiveError::NoUserfaultfd);
        };
        let uffd =
            crate::guest::uffd::Uffd::take_from(pid, fd).map_err(ReceiveError::Userfaultfd)?;
        Ok(crate::migration::postcopy::Destination::new(
            uffd,
            guest.mem_addr(),
            limits,
            missing,
            self.prepared.prepage,
        ))
    }

    /// The guest runs; its missing pages arrive by request and by the
    /// source's push. Done when every page is present.
    pub(super) fn postcopy_phase(
        &mut self,
        sock: &mut Conn,
        landed: &Landed,
        guest: &mut Guest,
        limits: &Limits,
        dest: &crate::migration::postcopy::Destination,
        req: Conn,
    ) -> Result<(), ReceiveError> {
        self.context = "the source's post-copy push".into();
        let (t0, ops0) = (Instant::now(), guest.ops());
        let io = |e: std::io::Error| {
            ReceiveError::Protocol(InContext {
                context: "post-copy: the request connection".into(),
                source: ProtocolError::Io(e),
            })
        };
        let reader = req.try_clone().map_err(io)?;
        let closer = req.try_clone().map_err(io)?;
        dest.wake_on_failure(sock.try_clone().map_err(io)?);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| dest.serve_faults(req));
            scope.spawn(|| dest.serve_replies(reader, limits, landed));
            let r = self.push_phase(sock, landed, limits, dest);
            let populated = t0.elapsed();
            dest.stop();
            // Done: close our side and let the reader drain replies still
            // in flight until the source closes (a reset there would fail a
            // finished migration). Failed: close both at once.
            let how = if r.is_ok() {
                Shutdown::Write
            } else {
                Shutdown::Both
            };
            let _ = closer.shutdown(how);
            r.map(|()| populated)
        });
        let mut stats = dest.stats();
        let took = match result {
            Ok(took) => took,
            Err(e) => {
                // The guest cannot run on without its missing pages.
                self.report.postcopy = Some(stats);
                let why = dest.failure().map_or(String::new(), |f| {
                    format!(" ({})", crate::util::error::error_chain(&f))
                });
                return Err(ReceiveError::PostcopyFailed {
                    missing: dest.remaining(),
                    why,
                    source: Box::new(e),
                });
            }
        };
        stats.postcopy_populated_ms = Some(crate::report::ms(took));
        stats.guest_rate_postcopy_pps =
            Some((guest.ops() - ops0) as f64 / took.as_secs_f64().max(1e-9));
        self.report.postcopy = Some(stats);
        Ok(())
    }

    /// The source's push on the control connection: one round of pages,
    /// then wait until every page is present and acknowledge it.
    fn push_phase(
        &mut self,
        sock: &mut Conn,
        landed: &Landed,
        limits: &Limits,
        dest: &crate::migration::postcopy::Destination,
    ) -> Result<(), ReceiveError> {
        use crate::migration::postcopy::Path;
        let failed = ReceiveError::Postcopy;
        let mut buf = Vec::new();
        let mut round = None;
        loop {
            if let Some(why) = dest.failure() {
                return Err(failed(why));
            }
            match self.next(sock, limits)? {
                Frame::Message(Message::RoundStart(RoundStart {
                    round: r,
                    stop_and_copy: false,
                })) if round.is_none() => round = Some(r),
                Frame::Run(PageRun::Pages { first_page, count }) if round.is_some() => {
                    buf.resize(count as usize * limits.page_size as usize, 0);
                    protocol::read_bulk(sock, &mut buf, Kind::Pages).map_err(|e| self.err(e))?;
                    dest.place(first_page, &buf, landed, Path::Pushed)
                        .map_err(failed)?;
                }
                Frame::Message(Message::RoundEnd(RoundEnd { round: r, .. }))
                    if round == Some(r) =>
                {
                    let deadline = Instant::now() + crate::migration::postcopy::request_timeout();
                    while dest.remaining() > 0 {
                        if let Some(why) = dest.failure() {
                            return Err(failed(why));
                        }
                        if Instant::now() > deadline {
                            return Err(ReceiveError::PushIncomplete(dest.remaining()));
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let ack = Message::round_ack(r);
                    protocol::write_message(sock, &ack).map_err(|e| self.err(e))?;
                    return Ok(());
                }
                Frame::Message(Message::Abort(Abort(reason))) => {
                    return Err(self.err(ProtocolError::Aborted(reason)))
                }
                other => return Err(self.err(unexpected_frame(&self.context, other))),
            }
        }
    }
}
