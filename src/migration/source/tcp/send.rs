//! Sending a round's pages, and post-copy's pages: the data path of
//! [`Tcp`], apart from the state machine's steps.

use std::io::{IoSlice, Write};
use std::time::Instant;

use super::{expect_ack, Tcp};
use crate::migration::postcopy;
use crate::migration::source::streams::{peer_error, proto, Pass, Sent};
use crate::migration::source::SendError;
use crate::report::{ms, Report};
use crate::util::netio::write_all_vectored;
use crate::wire::datapath::chunk_pages;
use crate::wire::protocol::{self, Message, ProtocolError};

impl Tcp<'_> {
    /// Send one round of `self.todo`: RoundStart, the pages as runs
    /// straight from the mapping (from `pass.from` on, until `pass.stop`
    /// says), RoundEnd. The stop-and-copy round's RoundStart went out
    /// before the pause and its RoundEnd waits for the device state
    /// ([`Tcp::pending_end`]): two writes fewer in the downtime. Returns
    /// (pages, bytes, the page it stopped at).
    pub(super) fn send_round(
        &mut self,
        round: u32,
        stop_and_copy: bool,
        pass: Pass<'_>,
        report: &mut Report,
    ) -> Result<(u64, u64, Option<u64>), SendError> {
        let ctx = format!("sending round {round}");
        let ctx = ctx.as_str();
        let page_size = self.src.mem.page_size();
        let chunk = chunk_pages(self.limiter.limit(), page_size);
        self.progress.set_message(match stop_and_copy {
            true => "stop-and-copy".into(),
            false => format!("round {round}"),
        });
        self.progress.set_length(self.todo.count());
        self.progress.set_position(0);
        let conn = self.conn.as_mut().expect("connected in setup");
        let sock = &mut conn.control;
        let t0 = Instant::now();
        let start = Message::round_start(round, stop_and_copy);
        let mut bytes = match stop_and_copy {
            true => start.encode().len() as u64,
            false => protocol::write_message(sock, &start).map_err(proto(ctx))? as u64,
        };
        let lanes = conn.lanes.as_mut().expect("open until the last page");
        let mut pages0 = 0;
        if let Some(tp) = self.teleport.as_mut().filter(|t| t.accepted()) {
            if round == 0 && !stop_and_copy {
                // auto: measure the network on a slice of the other pages first.
                let mut net_rate = None;
                if let Some(slice) = tp.probe_slice(&self.todo) {
                    let t = Instant::now();
                    let whole = Pass {
                        from: 0,
                        stop: &mut |_| false,
                    };
                    let Sent {
                        pages: p,
                        bytes: b,
                        forms: f,
                        ..
                    } = lanes.send(
                        sock,
                        round,
                        &slice,
                        chunk,
                        whole,
                        ctx,
                        &mut report.stream_pages,
                        &self.cfg.cancel,
                    )?;
                    net_rate = Some(b as f64 / t.elapsed().as_secs_f64().max(1e-6));
                    slice
                        .runs(u64::MAX)
                        .for_each(|(f0, n)| (f0..f0 + n).for_each(|pg| self.todo.remove(pg)));
                    (pages0, bytes) = (p, bytes + b);
                    report.forms += f;
                }
                let dirty = report.guest_dirty_rate_pps;
                bytes += tp.send_map(sock, net_rate, dirty, &mut self.todo)?;
            } else {
                tp.network_sends(&self.todo);
            }
        }
        let Sent {
            pages,
            bytes: stream_bytes,
            forms,
            stopped_at,
        } = lanes.send(
            sock,
            round,
            &self.todo,
            chunk,
            pass,
            ctx,
            &mut report.stream_pages,
            &self.cfg.cancel,
        )?;
        bytes += stream_bytes;
        report.forms += forms;
        let pages = pages + pages0;
        let end = Message::round_end(round, pages);
        bytes += match stop_and_copy {
            true => protocol::write_message(&mut self.pending_end, &end),
            false => protocol::write_message(sock, &end),
        }
        .map_err(proto(ctx))? as u64;
        if !stop_and_copy {
            // The round ends when its pages have landed (see crate::wire::protocol).
            expect_ack(sock, round, ctx)?;
        }
        if let Some(tp) = self.teleport.as_mut() {
            tp.stats.network_busy_ms += ms(t0.elapsed());
        }
        Ok((pages, bytes, stopped_at))
    }

    /// Post-copy: the pages the destination must fetch, as Discard runs.
    pub(super) fn announce_missing(&mut self, report: &mut Report) -> Result<(), SendError> {
        let conn = self.conn.as_mut().expect("connected in setup");
        for (first, count) in self.todo.runs(u64::from(u32::MAX)) {
            let frame = protocol::discard_frame_header(first, count as u32);
            conn.control
                .write_all(&frame)
                .map_err(|e| proto("sending the pages to fetch")(ProtocolError::Io(e)))?;
            report.transferred_bytes += frame.len() as u64;
        }
        Ok(())
    }

    /// The background push of post-copy: the missing pages the server has
    /// not sent yet, then wait until the destination has every page.
    /// Returns (pages, bytes).
    pub(super) fn push(
        &mut self,
        round: u32,
        server: &postcopy::Server,
    ) -> Result<(u64, u64), SendError> {
        let ctx = "pushing post-copy pages";
        let page_size = self.src.mem.page_size();
        let chunk = chunk_pages(self.limiter.limit(), page_size);
        self.progress.set_message("post-copy");
        self.progress.set_length(self.todo.count());
        self.progress.set_position(0);
        let sock = &mut self.conn.as_mut().expect("connected in setup").control;
        let mut bytes = protocol::write_message(sock, &Message::round_start(round, false))
            .map_err(proto(ctx))? as u64;
        let mut pushed = 0u64;
        for (first, count) in self.todo.runs(chunk) {
            // Skip what a request already took; send the rest in sub-runs.
            let mut p = first;
            while p < first + count {
                if !server.sent.mark(p) {
                    p += 1;
                    continue;
                }
                let mut end = p + 1;
                while end < first + count && server.sent.mark(end) {
                    end += 1;
                }
                let n = end - p;
                let header = protocol::pages_frame_header(p, n as u32, page_size.as_u32());
                // SAFETY: the source guest is paused: nothing writes its memory.
                let data = unsafe { self.src.mem.pages(p, n) };
                self.limiter.acquire((header.len() + data.len()) as u64);
                write_all_vectored(sock, &mut [IoSlice::new(&header), IoSlice::new(data)])
                    .map_err(|e| {
                        peer_error(sock, ctx).unwrap_or_else(|| proto(ctx)(ProtocolError::Io(e)))
                    })?;
                bytes += (header.len() + data.len()) as u64;
                pushed += n;
                self.progress.inc(n);
                p = end;
            }
        }
        bytes += protocol::write_message(sock, &Message::round_end(round, pushed))
            .map_err(proto(ctx))? as u64;
        // Acknowledged once every page is present at the destination.
        expect_ack(sock, round, ctx)?;
        Ok((pushed, bytes))
    }
}
