//! A recorded session replayed in memory: the bytes a sender wrote on its
//! one connection go through the destination's own handshake, frame loop
//! and verification, with no socket and no guest process. This is the seam
//! the session fuzz target (`fuzz/`) and the property tests drive; every
//! check a real receiver makes on those frames is made here by the same
//! code.
//!
//! What needs a guest or other connections is left out: the device state
//! is parsed but no guest starts; a post-copy session ends at its device
//! state (its pages would come on request); a `Hello` asking for data
//! connections is refused.

use std::io::{Read, Write};

use super::{ControlConn, Prepared, ReceiveError, ReceiveReport, Receiving};
use crate::guest::process::DeviceState;
use crate::report::Status;
use crate::util::cancel::Cancel;
use crate::wire::datapath::Landed;
use crate::wire::transport::{Conn, Security};

/// A connection in memory: reads the recorded bytes, drops the replies.
pub struct ReplayConn<'a> {
    input: &'a [u8],
    /// Bytes the destination wrote (its replies).
    pub replied: u64,
}

impl<'a> ReplayConn<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { input, replied: 0 }
    }
}

impl Read for ReplayConn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for ReplayConn<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.replied += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ControlConn for ReplayConn<'_> {
    fn conn(&self) -> Option<&Conn> {
        None
    }
}

/// Replay the sender's side of a one-connection session into destination
/// memory of `memory_bytes` (a `Hello` for another size is refused, as by
/// `receive --mem`). The report is filled in as far as the session got.
pub fn replay(
    conn: &mut impl ControlConn,
    memory_bytes: u64,
) -> (ReceiveReport, Result<(), ReceiveError>) {
    let prepared = Prepared::new(Some(memory_bytes), false, 0);
    let mut rx = Receiving {
        report: ReceiveReport {
            transport: Security::Plain.name().into(),
            ..ReceiveReport::default()
        },
        context: "handshake".into(),
        prepared: Prepared {
            mem: None,
            prealloc: false,
            prealloc_ms: 0.0,
            prepage: 0,
            probe: None,
            storage: None,
        },
        cancel: Cancel::default(),
        interrupt: None,
        security: Security::Plain,
        gate: None,
    };
    let result = prepared.and_then(|p| {
        rx.prepared = p;
        rx.replay(conn)
    });
    rx.report.status = match &result {
        Ok(()) => Status::Completed,
        Err(_) => Status::Failed,
    };
    if let Err(e) = &result {
        rx.report.error = Some(crate::util::error::error_chain(e));
    }
    (rx.report, result)
}

impl Receiving {
    fn replay(&mut self, sock: &mut impl ControlConn) -> Result<(), ReceiveError> {
        let (hello, limits, mem) = self.accept_hello(sock, None)?;
        if hello.streams > 1 {
            return Err(ReceiveError::ReplayStreams(hello.streams));
        }
        let (pages, page_size) = (mem.page_count(), mem.page_size());
        let landed = Landed::new(pages, page_size);
        let switched =
            self.until_device_state(sock, &mem, &landed, &limits, None, hello.postcopy)?;
        self.context = "resuming the guest".into();
        DeviceState::from_bytes(&switched.state, hello.memory_bytes, page_size)?;
        if hello.postcopy {
            return Ok(());
        }
        self.verify(sock, &landed, &limits, pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::protocol::{self, Message};

    fn frames(ms: &[Message]) -> Vec<u8> {
        ms.iter().flat_map(Message::encode).collect()
    }

    #[test]
    fn a_session_cut_after_its_hello_fails_waiting_for_round_0() {
        let bytes = frames(&[Message::hello(4096, 1 << 20, 1, 7)]);
        let (report, r) = replay(&mut ReplayConn::new(&bytes), 1 << 20);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("waiting for round 0"), "{e}");
        assert_eq!(report.status, Status::Failed);
        assert_eq!(report.memory_bytes, 1 << 20);
    }

    #[test]
    fn data_connections_and_other_sizes_are_refused() {
        let bytes = frames(&[Message::hello(4096, 1 << 20, 2, 7)]);
        let e = replay(&mut ReplayConn::new(&bytes), 1 << 20).1.unwrap_err();
        assert!(matches!(e, ReceiveError::ReplayStreams(2)), "{e}");
        let bytes = frames(&[Message::hello(4096, 2 << 20, 1, 7)]);
        let e = replay(&mut ReplayConn::new(&bytes), 1 << 20).1.unwrap_err();
        assert!(matches!(e, ReceiveError::PreparedFor { .. }), "{e}");
    }

    #[test]
    fn an_empty_round_then_a_bad_device_state_is_refused_naming_it() {
        let mut bytes = frames(&[
            Message::hello(4096, 1 << 20, 1, 7),
            Message::round_start(0, true),
            Message::round_end(0, 0),
            Message::device_state(b"{}".to_vec()),
        ]);
        bytes.extend(protocol::zero_frame_header(0, 1));
        let e = replay(&mut ReplayConn::new(&bytes), 1 << 20).1.unwrap_err();
        assert!(e.to_string().contains("device state"), "{e}");
    }
}
