//! The livemig wire protocol: framing, encoding, decoding and validation.
//!
//! The sender streams guest memory to the receiver over one TCP connection as
//! a sequence of frames. Every frame starts with a fixed 8-byte [`Header`]:
//! `kind: u16, flags: u16, payload_len: u32`, all little-endian, followed by
//! exactly `payload_len` payload bytes. Control frames are decoded whole into a
//! [`Message`]; the run frames are returned by [`read_frame`] as a [`Frame`]
//! carrying only their 16-byte run header (`first_page: u64, count: u32,
//! field: u32`), so the caller reads the page bytes (or digests) straight
//! into their destination.
//!
//! Each layout is stated once, as a `#[repr(C)]` struct of little-endian
//! fields (`zerocopy`'s `U32<LE>`, ...): the frame header in `header.rs`, the
//! run header in `run.rs`, and per control message, in `control.rs` and
//! `handshake.rs`, one struct and one [`Control`] implementation giving its
//! kind, its [`Size`] (derived from the struct), its encoder and its decoder
//! with the checks on its fields. `message.rs` declares [`Message`] from the
//! list of message types; nothing else lists them.
//!
//! The types keep apart what a reader may be handed: [`expect_message`] and
//! [`read_handshake`] return the one message type asked for, and a
//! [`PageRun`] (what the data path decodes into memory) is never a control
//! message, a `Discard` or a `Digests` run.
//!
//! A run of pages travels in one of four forms (see [`crate::wire::datapath`]):
//! `Pages` (raw bytes), `ZeroPages` (a marker, no bytes: QEMU's duplicate
//! pages), `CompressedPages` (the run compressed as one block; `field` names
//! the codec; always smaller than the raw run) and `XbzrlePages` (per page a
//! u16 length and an XBZRLE delta against the version the receiver holds).
//!
//! Nothing from the wire is trusted: kind 0 and unknown kinds are rejected,
//! unknown flag bits and nonzero reserved fields are rejected, fixed-size
//! frames must have exactly their size, and every length, page index and
//! count is checked against caps and the negotiated [`Limits`] before any
//! allocation or use.
//!
//! ```text
//! sender                                  receiver
//!   | Hello{magic,version,page_size,mem,  ->|  validates magic, version, sizes
//!   |       streams,session}               |
//!   |<- HelloAck{magic,version}  (or Abort)|
//!   | (streams > 1: N more connections,    |
//!   |  each opening with StreamHello{magic,|
//!   |  version,index,session})           ->|  page runs then travel on those
//!   | RoundStart{0} Pages* RoundEnd{0}   ->|  round 0: every page
//!   |<- RoundAck{0}                        |  the round's pages have all landed
//!   | RoundStart{k} Pages* RoundEnd{k}   ->|  round k: pages dirtied in round k-1
//!   |<- RoundAck{k}                        |
//!   |   ... guest paused ...               |
//!   | RoundStart{n,STOP_AND_COPY} Pages* RoundEnd{n} ->|  (no ack: pipelined)
//!   | DeviceState{blob}                  ->|  starts the guest on the received memory
//!   |<- Resumed{resume_ns}                 |  downtime ends here
//!   | Digests* Complete                  ->|  per-page xxh3 of the paused source, in page order
//!   |<- Verdict{verified, mismatched}      |
//! ```
//!
//! With `streams` = 1 everything travels on the one connection. With N > 1
//! (QEMU's multifd) the first connection carries only control frames and
//! digests; page runs of a round are spread over the N data connections,
//! each of which ends its share of round k with its own `RoundEnd{k, pages}`.
//! The receiver acknowledges round k (or starts the guest, after the
//! stop-and-copy round) only once every data connection has ended it, so a
//! page of round k+1 can never land before its round-k version.
//!
//! Post-copy and hybrid (Hello flag `POSTCOPY`) open one more connection,
//! `StreamHello{index: REQUEST_STREAM}`, for page requests only, so a
//! demand fault is never queued behind the bulk push:
//!
//! ```text
//!   | (hybrid: pre-copy rounds as above)   |
//!   |   ... guest paused ...               |
//!   | Discard{run}*                      ->|  pages the destination must fetch
//!   | DeviceState{blob}                  ->|  starts the guest, its memory
//!   |<- Resumed{resume_ns}                 |    registered for missing faults
//!   | RoundStart{k} Pages*               ->|  the background push
//!   |<- PageRequest{run}  (request conn.)  |  a guest fault
//!   | Pages{run}          (request conn.)->|  placed at once (UFFDIO_COPY)
//!   | RoundEnd{k}                        ->|
//!   |<- RoundAck{k}                        |  every page is present
//!   | Digests* Complete / Verdict          |  as above
//! ```
//!
//! A pre-copy round ends when its `RoundAck` arrives, so a round's measured
//! time covers delivery, not just filling the sender's socket buffer (which
//! on loopback holds megabytes); it costs one round trip per round.
//!
//! Either side may send `Abort{reason}` at any point and close the connection.
//! [`read_frame`] takes the negotiated [`Limits`] once the receiver has
//! accepted the `Hello`; without them (`None`) it still decodes control
//! frames but refuses the run frames, whose ranges it could not check.
//!
//! # Protocol versioning
//!
//! The first message each way (`Hello`, `HelloAck`, and `StreamHello` on
//! the extra connections) begins with [`MAGIC`] and [`VERSION`], and these
//! two fields keep their position in every future version. A reader checks the magic first (garbage or a foreign service
//! gives "not a livemig peer"), then the version (any other version gives a
//! clear "peer speaks protocol version N" error), and only then the rest of
//! the payload, so an old build facing a new peer reports the version, not a
//! confusing length error. There is no negotiation: both sides must speak
//! exactly the same version. Any change to the framing, to a payload layout
//! or to the meaning of a field bumps [`VERSION`]. Adding a message kind or
//! flag bit also needs a bump, because unknown kinds and flags are rejected.
//! Version 3 added the `--psk` challenge-response (`AuthHello`,
//! `AuthChallenge`, `AuthProof`, see `auth.rs`), which opens every
//! connection of a PSK migration. Version 4 added page-cache teleportation
//! (`TeleportOffer`, `TeleportAck`, `TeleportMap`, `TeleportSync`,
//! `TeleportDone`, see `teleport.rs`). TLS (`--tls-*`) wraps every connection
//! below the framing and changes nothing here.
//! The golden test (`golden.rs`) holds the exact bytes of one frame of every
//! kind: if it fails, the wire changed.

mod auth;
mod control;
mod handshake;
mod header;
mod message;
mod run;
mod teleport;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

pub use auth::{AuthChallenge, AuthHello, AuthProof, AUTH_LEN};
pub use control::{
    Abort, Complete, Control, DeviceState, PageRequest, Resumed, RoundAck, RoundEnd, RoundStart,
    Size, Verdict,
};
pub use handshake::{Handshake, Hello, HelloAck, StreamHello};
pub use header::{
    Header, InContext, Kind, Limits, ProtocolError, CONTROL_STREAM, FLAG_STOP_AND_COPY, HEADER_LEN,
    HELLO_POSTCOPY, MAGIC, MAX_ABORT_REASON, MAX_CONTROL_PAYLOAD, MAX_DIGESTS, MAX_PAGE_SIZE,
    MAX_RUN_PAGES, MAX_STREAMS, MIN_PAGE_SIZE, REQUEST_STREAM, VERSION,
};
pub use message::Message;
pub use run::{
    compressed_frame_header, digests_frame_header, discard_frame_header, pages_frame_header,
    xbzrle_frame_header, zero_frame_header, Frame, PageRun, RUN_FRAME_HEADER_LEN, RUN_HEADER_LEN,
};
pub use teleport::{
    MapEntry, TeleportAck, TeleportDone, TeleportMap, TeleportOffer, TeleportSync, MAX_MAP_ENTRIES,
    MAX_MAP_RUN,
};

use header::unexpected;

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            // Some readers report a closed stream this way; treat it as EOF.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(n)
}

/// Reads the bulk of a run frame (exactly `buf.len()` bytes); EOF gives
/// `Truncated` naming the frame and the missing byte count.
pub fn read_bulk(r: &mut impl Read, buf: &mut [u8], kind: Kind) -> Result<(), ProtocolError> {
    read_in(r, buf, kind, 0)
}

/// Like [`read_bulk`]; `more` bytes of the frame follow `buf`.
fn read_in(r: &mut impl Read, buf: &mut [u8], kind: Kind, more: u64) -> Result<(), ProtocolError> {
    let got = read_full(r, buf)?;
    if got < buf.len() {
        let missing = u64::try_from(buf.len() - got).unwrap_or(u64::MAX);
        let (inside, needed) = (format!("a {kind} frame"), missing.saturating_add(more));
        return Err(ProtocolError::Truncated { inside, needed });
    }
    Ok(())
}

/// Reads the `count` digests following a [`Frame::Digests`] (pass its validated count).
pub fn read_digests(r: &mut impl Read, count: u32) -> Result<Vec<u64>, ProtocolError> {
    let count = count.min(MAX_DIGESTS);
    let mut buf = vec![0u8; usize::try_from(count).unwrap_or(0) * 8];
    read_bulk(r, &mut buf, Kind::Digests)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

fn read_header(r: &mut impl Read) -> Result<[u8; HEADER_LEN], ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    match read_full(r, &mut b)? {
        0 => Err(ProtocolError::Closed),
        HEADER_LEN => Ok(b),
        n => Err(ProtocolError::Truncated {
            inside: "a frame header".into(),
            needed: u64::try_from(HEADER_LEN - n).unwrap_or(0),
        }),
    }
}

fn read_body(r: &mut impl Read, h: Header, lim: Option<&Limits>) -> Result<Frame, ProtocolError> {
    let Some(size) = message::size(h.kind) else {
        // A run frame: its run header now, its bulk by the caller.
        let Some(l) = lim else {
            return Err(unexpected(
                h.kind,
                "a control frame (no page limits negotiated)",
            ));
        };
        let body = run::body_len(&h)?;
        let mut b = [0u8; RUN_HEADER_LEN];
        read_in(r, &mut b, h.kind, body)?;
        return run::decode(&h, b, l);
    };
    size.check(h.kind, u64::from(h.len))?;
    // Capped by the size check at MAX_CONTROL_PAYLOAD.
    let mut p = vec![0u8; usize::try_from(h.len).unwrap_or(0)];
    read_in(r, &mut p, h.kind, 0)?;
    message::decode(&h, p, lim).map(Frame::Message)
}

/// Reads one frame, validating everything. With `limits` None (before the
/// handshake, or a side that only reads replies) control frames are decoded
/// and run frames rejected. For run frames only the 16-byte run header is
/// consumed; the caller must then read exactly the bulk the [`Frame`] says
/// (`count*page_size`, `count*8` or `len` bytes), e.g. with [`read_bulk`] /
/// [`read_digests`].
pub fn read_frame(r: &mut impl Read, limits: Option<&Limits>) -> Result<Frame, ProtocolError> {
    let h = Header::decode(read_header(r)?)?;
    read_body(r, h, limits)
}

/// Reads a control message of type `M`; an `Abort` becomes
/// [`ProtocolError::Aborted`], anything else [`ProtocolError::Unexpected`].
pub fn expect_message<M>(r: &mut impl Read, limits: Option<&Limits>) -> Result<M, ProtocolError>
where
    M: Control + TryFrom<Message, Error = Message>,
{
    match read_frame(r, limits)? {
        Frame::Message(Message::Abort(Abort(why))) if M::KIND != Kind::Abort => {
            Err(ProtocolError::Aborted(why))
        }
        Frame::Message(m) => M::try_from(m).map_err(|m| unexpected(m.kind(), M::KIND)),
        f => Err(unexpected(f.kind(), M::KIND)),
    }
}

/// Reads the first frame on a fresh connection and insists it is an `M`
/// (`Hello`, `HelloAck` or `StreamHello`) with the right magic and version.
/// A header that does not decode (garbage, another service) gives
/// `NotLivemig`; an `Abort` gives `Aborted`.
pub fn read_handshake<M>(r: &mut impl Read) -> Result<M, ProtocolError>
where
    M: Handshake + TryFrom<Message, Error = Message>,
{
    let got = read_header(r)?;
    let h = Header::decode(got).map_err(|_| match got {
        // A TLS record: a handshake (0x16) or an alert (0x15), TLS 1.x.
        [0x15 | 0x16, 0x03, ..] => ProtocolError::TlsPeer,
        got => ProtocolError::NotLivemig { got },
    })?;
    match (h.kind, M::KIND) {
        (Kind::AuthHello, k) if k != Kind::AuthHello => return Err(ProtocolError::PskPeer),
        (Kind::Hello | Kind::StreamHello, Kind::AuthHello) => return Err(ProtocolError::NoPsk),
        (k, want) if k != want && k != Kind::Abort => return Err(unexpected(k, want)),
        _ => {}
    }
    match read_body(r, h, None)? {
        Frame::Message(Message::Abort(Abort(why))) => Err(ProtocolError::Aborted(why)),
        Frame::Message(m) => M::try_from(m).map_err(|m| unexpected(m.kind(), M::KIND)),
        f => Err(unexpected(f.kind(), M::KIND)),
    }
}

/// Encodes and writes one control message, refusing a payload its kind's
/// [`Size`] does not admit (an empty or oversized `DeviceState`). Returns
/// the frame's length on the wire (header included).
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<usize, ProtocolError> {
    let frame = m.encode();
    let len = u64::try_from(frame.len() - HEADER_LEN).unwrap_or(u64::MAX);
    if let Some(size) = message::size(m.kind()) {
        size.check(m.kind(), len)?;
    }
    w.write_all(&frame).map_err(ProtocolError::Io)?;
    Ok(frame.len())
}
