//! The livemig wire protocol: framing, encoding, decoding and validation.
//!
//! The sender streams guest memory to the receiver over one TCP connection as
//! a sequence of frames. Every frame starts with a fixed 8-byte [`Header`]:
//! `kind: u16, flags: u16, payload_len: u32`, all little-endian, followed by
//! exactly `payload_len` payload bytes. Control frames are decoded whole into a
//! [`Message`]; the bulk frames are returned by [`read_frame`] as a [`Frame`]
//! carrying only their 16-byte run header (`first_page: u64, count: u32,
//! field: u32`), so the caller reads the page bytes (or digests) straight
//! into their destination.
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
//! frames but refuses `Pages`/`Digests`, whose ranges it could not check.
//!
//! # Protocol versioning
//!
//! The first message each way (`Hello`, `HelloAck`) begins with [`MAGIC`] and
//! [`VERSION`], and these two fields keep their position in every future
//! version. A reader checks the magic first (garbage or a foreign service
//! gives "not a livemig peer"), then the version (any other version gives a
//! clear "peer speaks protocol version N" error), and only then the rest of
//! the payload, so an old build facing a new peer reports the version, not a
//! confusing length error. There is no negotiation: both sides must speak
//! exactly the same version. Any change to the framing, to a payload layout
//! or to the meaning of a field bumps [`VERSION`]. Adding a message kind or
//! flag bit also needs a bump, because unknown kinds and flags are rejected.

use std::fmt;
use std::io::{self, Read, Write};

use crate::wire::reduce::Codec;

/// First 8 bytes of every `Hello` and `HelloAck` payload.
pub const MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// Protocol version spoken by this build.
pub const VERSION: u32 = 2;
/// Size of the frame header.
pub const HEADER_LEN: usize = 8;
/// Cap on the payload of any frame other than `Pages` and `Digests`.
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;
/// Maximum pages in one `Pages`, `CompressedPages` or `XbzrlePages` frame.
pub const MAX_RUN_PAGES: u32 = 1024;
/// Most data connections a migration may use.
pub const MAX_STREAMS: u32 = 64;
/// Maximum digests in one `Digests` frame.
pub const MAX_DIGESTS: u32 = 65536;
/// Run header of `Pages`/`Digests`: first_page u64, count u32, reserved u32.
pub const RUN_HEADER_LEN: usize = 16;
/// Maximum length of an `Abort` reason in bytes.
pub const MAX_ABORT_REASON: usize = 4096;
/// `RoundStart` flag: this round runs with the guest paused.
pub const FLAG_STOP_AND_COPY: u16 = 1;
/// `Hello` flag: a post-copy migration (a request connection follows).
pub const HELLO_POSTCOPY: u32 = 1;
/// `StreamHello` index of the post-copy request connection.
pub const REQUEST_STREAM: u32 = u32::MAX;
/// Smallest accepted page size (page sizes are powers of two).
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest accepted page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// Everything that can go wrong on the wire; each message is one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer is not a livemig peer (bad magic {})", show_magic(.got))]
    NotLivemig { got: [u8; 8] },
    #[error("peer speaks protocol version {peer}, this build speaks {VERSION}")]
    Version { peer: u32 },
    #[error("truncated stream: connection closed inside {inside} (needed {needed} more bytes)")]
    Truncated { inside: String, needed: u64 },
    #[error("connection closed by peer")]
    Closed,
    #[error("frame kind 0 is reserved and invalid")]
    InvalidKind,
    #[error("unknown frame kind {0} (this build speaks protocol version {VERSION})")]
    UnknownKind(u16),
    #[error("frame {kind}: unknown flag bits 0x{flags:04x}")]
    BadFlags { kind: Kind, flags: u16 },
    #[error("frame {kind}: payload of {len} bytes, expected {expected}")]
    BadLength {
        kind: Kind,
        len: u64,
        expected: String,
    },
    #[error("frame {kind}: payload of {len} bytes exceeds the cap of {cap}")]
    TooLarge { kind: Kind, len: u64, cap: u64 },
    #[error("frame {kind}: reserved field is 0x{value:x}, must be 0")]
    Reserved { kind: Kind, value: u64 },
    #[error("frame {kind}: count {count} outside 1..={max}")]
    BadCount { kind: Kind, count: u32, max: u32 },
    #[error("frame {kind}: page run {first}+{count} out of range (memory has {page_count} pages)")]
    OutOfRange {
        kind: Kind,
        first: u64,
        count: u32,
        page_count: u64,
    },
    #[error("frame {kind}: {detail}")]
    BadField { kind: Kind, detail: String },
    #[error("peer's Hello is unacceptable: {0}")]
    BadHello(String),
    #[error("unexpected frame {got} (expected {expected})")]
    Unexpected { got: Kind, expected: String },
    #[error("peer aborted: {0}")]
    Aborted(String),
    #[error("i/o error on the migration connection")]
    Io(#[source] io::Error),
}

/// `0x4854545020..  "HTTP/1.1"`: hex plus the bytes as (lossy, escaped) text.
fn show_magic(b: &[u8; 8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("0x{hex} {:?}", String::from_utf8_lossy(b))
}

/// Frame kinds. Kind 0 is reserved as invalid.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    HelloAck = 2,
    RoundStart = 3,
    Pages = 4,
    RoundEnd = 5,
    DeviceState = 6,
    Resumed = 7,
    Digests = 8,
    Complete = 9,
    Verdict = 10,
    Abort = 11,
    RoundAck = 12,
    StreamHello = 13,
    ZeroPages = 14,
    CompressedPages = 15,
    XbzrlePages = 16,
    Discard = 17,
    PageRequest = 18,
}

impl TryFrom<u16> for Kind {
    type Error = ProtocolError;
    fn try_from(v: u16) -> Result<Kind, ProtocolError> {
        use Kind::*;
        Ok(match v {
            0 => return Err(ProtocolError::InvalidKind),
            1 => Hello,
            2 => HelloAck,
            3 => RoundStart,
            4 => Pages,
            5 => RoundEnd,
            6 => DeviceState,
            7 => Resumed,
            8 => Digests,
            9 => Complete,
            10 => Verdict,
            11 => Abort,
            12 => RoundAck,
            13 => StreamHello,
            14 => ZeroPages,
            15 => CompressedPages,
            16 => XbzrlePages,
            17 => Discard,
            18 => PageRequest,
            _ => return Err(ProtocolError::UnknownKind(v)),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Kind {
    /// Exact payload size of fixed-size kinds.
    fn fixed_len(self) -> Option<usize> {
        match self {
            Kind::Hello => Some(40),
            Kind::Verdict | Kind::StreamHello => Some(24),
            Kind::HelloAck | Kind::RoundEnd | Kind::Resumed => Some(16),
            Kind::RoundStart | Kind::RoundAck => Some(8),
            Kind::PageRequest => Some(16),
            Kind::Complete => Some(0),
            _ => None,
        }
    }
    fn allowed_flags(self) -> u16 {
        if self == Kind::RoundStart {
            FLAG_STOP_AND_COPY
        } else {
            0
        }
    }
}

/// The fixed 8-byte frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and checks kind and flags (lengths are checked by [`read_frame`]).
    pub fn decode(b: [u8; 8]) -> Result<Header, ProtocolError> {
        let kind = Kind::try_from(u16::from_le_bytes([b[0], b[1]]))?;
        let flags = u16::from_le_bytes([b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if flags & !kind.allowed_flags() != 0 {
            return Err(ProtocolError::BadFlags { kind, flags });
        }
        Ok(Header { kind, flags, len })
    }
}

/// Negotiated limits every page index / count is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Data connections besides the control connection (1: none, pages
    /// travel on the control connection).
    pub streams: u32,
    pub page_size: u32,
    pub page_count: u64,
}

impl Limits {
    /// Checks that `first..first+count` lies inside guest memory.
    pub fn check_run(&self, kind: Kind, first: u64, count: u32) -> Result<(), ProtocolError> {
        match first.checked_add(u64::from(count)) {
            Some(end) if end <= self.page_count => Ok(()),
            _ => Err(ProtocolError::OutOfRange {
                kind,
                first,
                count,
                page_count: self.page_count,
            }),
        }
    }
}

/// The sender's opening message (magic is checked on decode, not stored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub page_size: u32,
    pub memory_bytes: u64,
    /// Connections that carry pages (1: the control connection itself).
    pub streams: u32,
    /// Ties the data connections to this migration.
    pub session: u64,
    /// Post-copy or hybrid: a request connection follows the data ones.
    pub postcopy: bool,
}

impl Hello {
    /// Validate against what this side accepts and derive the [`Limits`].
    pub fn limits(&self) -> Result<Limits, ProtocolError> {
        if self.version != VERSION {
            return Err(ProtocolError::Version { peer: self.version });
        }
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(ProtocolError::BadHello(format!(
                "page size {ps} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
            )));
        }
        let mem = self.memory_bytes;
        if mem == 0 || !mem.is_multiple_of(u64::from(ps)) {
            return Err(ProtocolError::BadHello(format!(
                "memory size {mem} bytes is not a positive multiple of the page size {ps}"
            )));
        }
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return Err(ProtocolError::BadHello(format!(
                "{} streams, outside 1..={MAX_STREAMS}",
                self.streams
            )));
        }
        Ok(Limits {
            streams: self.streams,
            page_size: ps,
            page_count: mem / u64::from(ps),
        })
    }
}

/// Control messages (fully decoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck {
        version: u32,
    },
    RoundStart {
        round: u32,
        stop_and_copy: bool,
    },
    /// The destination asks for a run of pages around one its guest
    /// faulted on, `fault` pages into the run (that one first, please).
    PageRequest {
        first_page: u64,
        count: u32,
        fault: u32,
    },
    RoundEnd {
        round: u32,
        pages: u64,
    },
    RoundAck {
        round: u32,
    },
    StreamHello {
        index: u32,
        session: u64,
    },
    DeviceState(Vec<u8>),
    Resumed {
        resume_ns: u64,
        pages_received: u64,
    },
    Complete,
    Verdict {
        verified_pages: u64,
        mismatched_pages: u64,
        first_mismatch: Option<u64>,
    },
    Abort(String),
}

impl Message {
    pub fn hello(page_size: u32, memory_bytes: u64, streams: u32, session: u64) -> Message {
        Message::Hello(Hello {
            version: VERSION,
            page_size,
            memory_bytes,
            streams,
            session,
            postcopy: false,
        })
    }
    pub fn page_request(first_page: u64, count: u32, fault: u32) -> Message {
        Message::PageRequest {
            first_page,
            count,
            fault,
        }
    }
    pub fn stream_hello(index: u32, session: u64) -> Message {
        Message::StreamHello { index, session }
    }
    pub fn hello_ack() -> Message {
        Message::HelloAck { version: VERSION }
    }
    pub fn round_start(round: u32, stop_and_copy: bool) -> Message {
        Message::RoundStart {
            round,
            stop_and_copy,
        }
    }
    pub fn round_end(round: u32, pages: u64) -> Message {
        Message::RoundEnd { round, pages }
    }
    pub fn round_ack(round: u32) -> Message {
        Message::RoundAck { round }
    }
    pub fn device_state(blob: Vec<u8>) -> Message {
        Message::DeviceState(blob)
    }
    pub fn resumed(resume_ns: u64, pages_received: u64) -> Message {
        Message::Resumed {
            resume_ns,
            pages_received,
        }
    }
    pub fn complete() -> Message {
        Message::Complete
    }
    pub fn verdict(
        verified_pages: u64,
        mismatched_pages: u64,
        first_mismatch: Option<u64>,
    ) -> Message {
        Message::Verdict {
            verified_pages,
            mismatched_pages,
            first_mismatch,
        }
    }
    /// Abort with a reason; reasons over [`MAX_ABORT_REASON`] bytes are cut on encode.
    pub fn abort(reason: impl Into<String>) -> Message {
        Message::Abort(reason.into())
    }

    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck { .. } => Kind::HelloAck,
            Message::RoundStart { .. } => Kind::RoundStart,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::RoundAck { .. } => Kind::RoundAck,
            Message::StreamHello { .. } => Kind::StreamHello,
            Message::DeviceState(_) => Kind::DeviceState,
            Message::Resumed { .. } => Kind::Resumed,
            Message::Complete => Kind::Complete,
            Message::Verdict { .. } => Kind::Verdict,
            Message::Abort(_) => Kind::Abort,
        }
    }

    /// Header + payload. A `DeviceState` outside 1..=[`MAX_CONTROL_PAYLOAD`]
    /// bytes encodes a frame the peer rejects; [`write_message`] refuses it.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let mut flags = 0;
        match self {
            Message::Hello(h) => {
                p.extend(MAGIC);
                p.extend(h.version.to_le_bytes());
                p.extend(h.page_size.to_le_bytes());
                p.extend(h.memory_bytes.to_le_bytes());
                p.extend(h.streams.to_le_bytes());
                let flags = if h.postcopy { HELLO_POSTCOPY } else { 0 };
                p.extend(flags.to_le_bytes());
                p.extend(h.session.to_le_bytes());
            }
            Message::StreamHello { index, session } => {
                p.extend(MAGIC);
                p.extend(VERSION.to_le_bytes());
                p.extend(index.to_le_bytes());
                p.extend(session.to_le_bytes());
            }
            Message::HelloAck { version } => {
                p.extend(MAGIC);
                p.extend(version.to_le_bytes());
                p.extend([0; 4]);
            }
            &Message::RoundStart {
                round,
                stop_and_copy: s,
            } => {
                flags = if s { FLAG_STOP_AND_COPY } else { 0 };
                p.extend(round.to_le_bytes());
                p.extend([0; 4]);
            }
            Message::PageRequest {
                first_page,
                count,
                fault,
            } => {
                p.extend(first_page.to_le_bytes());
                p.extend(count.to_le_bytes());
                p.extend(fault.to_le_bytes());
            }
            Message::RoundEnd { round, pages } => {
                p.extend(round.to_le_bytes());
                p.extend([0; 4]);
                p.extend(pages.to_le_bytes());
            }
            Message::RoundAck { round } => {
                p.extend(round.to_le_bytes());
                p.extend([0; 4]);
            }
            Message::DeviceState(blob) => p.extend_from_slice(blob),
            &Message::Resumed {
                resume_ns: a,
                pages_received: b,
            } => {
                p.extend(a.to_le_bytes());
                p.extend(b.to_le_bytes());
            }
            Message::Complete => {}
            &Message::Verdict {
                verified_pages: a,
                mismatched_pages: b,
                first_mismatch: c,
            } => {
                p.extend(a.to_le_bytes());
                p.extend(b.to_le_bytes());
                p.extend(c.unwrap_or(u64::MAX).to_le_bytes());
            }
            Message::Abort(reason) => {
                let mut end = reason.len().min(MAX_ABORT_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&reason.as_bytes()[..end]);
            }
        }
        // Payloads are capped far below u32::MAX except an oversized
        // DeviceState, which write_message rejects; saturate rather than wrap.
        let len = u32::try_from(p.len()).unwrap_or(u32::MAX);
        let kind = self.kind();
        let mut out = Header { kind, flags, len }.encode().to_vec();
        out.append(&mut p);
        out
    }
}

/// What [`read_frame`] returns: a control message, or the run header of a
/// data frame whose bulk (page bytes / digests) the caller reads next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    /// `count` raw pages follow.
    Pages {
        first_page: u64,
        count: u32,
    },
    /// `count` u64 digests follow.
    Digests {
        first_page: u64,
        count: u32,
    },
    /// The run is all zeros; nothing follows.
    ZeroPages {
        first_page: u64,
        count: u32,
    },
    /// Post-copy: the destination must fetch this run (nothing follows).
    Discard {
        first_page: u64,
        count: u32,
    },
    /// `len` bytes follow: the run compressed with `codec`.
    CompressedPages {
        first_page: u64,
        count: u32,
        codec: Codec,
        len: u32,
    },
    /// `len` bytes follow: per page a u16 length and an XBZRLE delta.
    XbzrlePages {
        first_page: u64,
        count: u32,
        len: u32,
    },
}

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

/// Reads the bulk of a `Pages`/`Digests` frame (exactly `buf.len()` bytes);
/// EOF gives `Truncated` naming the frame and the missing byte count.
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

fn read_header(r: &mut impl Read) -> Result<[u8; 8], ProtocolError> {
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

/// Little-endian cursor over a payload whose length was already validated.
struct Cur<'a>(&'a [u8]);

impl Cur<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((a, rest)) => {
                self.0 = rest;
                *a
            }
            None => [0; N], // unreachable: lengths are checked before decoding
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn reserved(kind: Kind, value: u64) -> Result<(), ProtocolError> {
    if value != 0 {
        return Err(ProtocolError::Reserved { kind, value });
    }
    Ok(())
}

fn bad_len(kind: Kind, len: u32, expected: impl fmt::Display) -> ProtocolError {
    ProtocolError::BadLength {
        kind,
        len: u64::from(len),
        expected: expected.to_string(),
    }
}

fn too_large(kind: Kind, len: u64, cap: usize) -> ProtocolError {
    let cap = u64::try_from(cap).unwrap_or(u64::MAX);
    ProtocolError::TooLarge { kind, len, cap }
}

fn unexpected(got: Kind, expected: impl fmt::Display) -> ProtocolError {
    let expected = expected.to_string();
    ProtocolError::Unexpected { got, expected }
}

/// Checks a control frame's length before its payload is read.
fn check_control_len(h: &Header) -> Result<(), ProtocolError> {
    let len = usize::try_from(h.len).unwrap_or(usize::MAX);
    let cap = match h.kind {
        Kind::Abort => MAX_ABORT_REASON,
        _ => MAX_CONTROL_PAYLOAD,
    };
    if len > cap {
        return Err(too_large(h.kind, u64::from(h.len), cap));
    }
    match h.kind {
        // Magic and version come first in every version: read them even if
        // the rest of the layout differs, so a mismatch reports the version.
        Kind::Hello | Kind::HelloAck | Kind::StreamHello if len < 12 => {
            Err(bad_len(h.kind, h.len, "at least 12"))
        }
        Kind::Hello | Kind::HelloAck | Kind::StreamHello => Ok(()),
        Kind::DeviceState if len == 0 => Err(bad_len(h.kind, h.len, "at least 1")),
        k => match k.fixed_len() {
            Some(n) if n != len => Err(bad_len(k, h.len, n)),
            _ => Ok(()),
        },
    }
}

fn decode_control(h: &Header, p: Vec<u8>, lim: Option<&Limits>) -> Result<Message, ProtocolError> {
    let kind = h.kind;
    let mut c = Cur(&p);
    if matches!(kind, Kind::Hello | Kind::HelloAck | Kind::StreamHello) {
        let got: [u8; 8] = c.take();
        if got != MAGIC {
            return Err(ProtocolError::NotLivemig { got });
        }
        let peer = c.u32();
        if peer != VERSION {
            return Err(ProtocolError::Version { peer });
        }
        if Some(p.len()) != kind.fixed_len() {
            return Err(bad_len(kind, h.len, kind.fixed_len().unwrap_or(0)));
        }
    }
    Ok(match kind {
        Kind::Hello => {
            let (page_size, memory_bytes, streams, flags) = (c.u32(), c.u64(), c.u32(), c.u32());
            reserved(kind, u64::from(flags & !HELLO_POSTCOPY))?;
            let mut m = Message::hello(page_size, memory_bytes, streams, c.u64());
            if let Message::Hello(h) = &mut m {
                h.postcopy = flags & HELLO_POSTCOPY != 0;
            }
            m
        }
        Kind::PageRequest => {
            let (first_page, count, fault) = (c.u64(), c.u32(), c.u32());
            if count == 0 || count > MAX_RUN_PAGES {
                let max = MAX_RUN_PAGES;
                return Err(ProtocolError::BadCount { kind, count, max });
            }
            if fault >= count {
                let detail = format!("faulted page {fault} outside the run of {count}");
                return Err(ProtocolError::BadField { kind, detail });
            }
            if let Some(l) = lim {
                l.check_run(kind, first_page, count)?;
            }
            Message::page_request(first_page, count, fault)
        }
        Kind::StreamHello => Message::stream_hello(c.u32(), c.u64()),
        Kind::HelloAck => {
            reserved(kind, u64::from(c.u32()))?;
            Message::hello_ack()
        }
        Kind::RoundStart => {
            let round = c.u32();
            reserved(kind, u64::from(c.u32()))?;
            Message::round_start(round, h.flags & FLAG_STOP_AND_COPY != 0)
        }
        Kind::RoundEnd => {
            let round = c.u32();
            reserved(kind, u64::from(c.u32()))?;
            Message::round_end(round, c.u64())
        }
        Kind::RoundAck => {
            let round = c.u32();
            reserved(kind, u64::from(c.u32()))?;
            Message::round_ack(round)
        }
        Kind::DeviceState => Message::DeviceState(p),
        Kind::Resumed => Message::resumed(c.u64(), c.u64()),
        Kind::Complete => Message::Complete,
        Kind::Verdict => {
            let (ok, bad, first) = (c.u64(), c.u64(), c.u64());
            let first_mismatch = (first != u64::MAX).then_some(first);
            if let Some(l) = lim {
                let n = l.page_count;
                let too_many = ok.checked_add(bad).is_none_or(|t| t > n);
                if too_many || first_mismatch.is_some_and(|f| f >= n) {
                    let detail = format!(
                        "{ok} verified + {bad} mismatched pages (first mismatch {first}) \
                         do not fit in memory of {n} pages"
                    );
                    return Err(ProtocolError::BadField { kind, detail });
                }
            }
            Message::verdict(ok, bad, first_mismatch)
        }
        // A peer's words end up on a terminal: escape control characters.
        Kind::Abort => Message::Abort(
            String::from_utf8_lossy(&p)
                .chars()
                .map(|c| match c.is_control() {
                    true => c.escape_default().to_string(),
                    false => c.to_string(),
                })
                .collect(),
        ),
        Kind::Invalid
        | Kind::Pages
        | Kind::Digests
        | Kind::ZeroPages
        | Kind::CompressedPages
        | Kind::XbzrlePages
        | Kind::Discard => {
            return Err(unexpected(kind, "a control frame"));
        }
    })
}

impl Kind {
    /// Frames that start with a run header and carry bulk data.
    fn is_run(self) -> bool {
        matches!(
            self,
            Kind::Pages
                | Kind::Digests
                | Kind::ZeroPages
                | Kind::CompressedPages
                | Kind::XbzrlePages
                | Kind::Discard
        )
    }
}

/// Reads the run header of a run frame and validates it, its payload length
/// included, against the limits.
fn read_run(r: &mut impl Read, h: &Header, l: &Limits) -> Result<Frame, ProtocolError> {
    let (kind, len) = (h.kind, u64::from(h.len));
    const RUN: u64 = RUN_HEADER_LEN as u64;
    if len < RUN {
        return Err(bad_len(kind, h.len, format!("at least {RUN}")));
    }
    let mut b = [0u8; RUN_HEADER_LEN];
    read_in(r, &mut b, kind, len - RUN)?;
    let mut c = Cur(&b);
    let (first_page, count, field) = (c.u64(), c.u32(), c.u32());
    let codec = match kind {
        Kind::CompressedPages => Some(Codec::from_wire(field).ok_or_else(|| {
            let detail = format!("unknown codec {field}");
            ProtocolError::BadField { kind, detail }
        })?),
        _ => {
            reserved(kind, u64::from(field))?;
            None
        }
    };
    let max = match kind {
        Kind::Digests => MAX_DIGESTS,
        // A marker costs nothing to receive: any run inside memory will do.
        Kind::ZeroPages | Kind::Discard => u32::MAX,
        _ => MAX_RUN_PAGES,
    };
    if count == 0 || count > max {
        return Err(ProtocolError::BadCount { kind, count, max });
    }
    l.check_run(kind, first_page, count)?;
    let (n, ps, body) = (u64::from(count), u64::from(l.page_size), len - RUN);
    let (fits, expected) = match kind {
        Kind::Pages => (
            body == n * ps,
            format!("{RUN} + {count}*{ps} = {}", RUN + n * ps),
        ),
        Kind::Digests => (
            body == n * 8,
            format!("{RUN} + {count}*8 = {}", RUN + n * 8),
        ),
        Kind::ZeroPages | Kind::Discard => (body == 0, format!("{RUN}")),
        // Compressing must pay: a run that does not shrink travels raw.
        Kind::CompressedPages => (
            (1..n * ps).contains(&body),
            format!("{RUN} + 1..{} (less than {count} raw pages)", n * ps),
        ),
        // Per page a u16 length and a delta shorter than the page.
        _ => (
            (2 * n..=n * (ps + 1)).contains(&body),
            format!("{RUN} + {}..={}", 2 * n, n * (ps + 1)),
        ),
    };
    if !fits {
        return Err(bad_len(kind, h.len, expected));
    }
    let len = h.len - RUN_HEADER_LEN as u32;
    Ok(match kind {
        Kind::Pages => Frame::Pages { first_page, count },
        Kind::Digests => Frame::Digests { first_page, count },
        Kind::ZeroPages => Frame::ZeroPages { first_page, count },
        Kind::Discard => Frame::Discard { first_page, count },
        Kind::CompressedPages => Frame::CompressedPages {
            first_page,
            count,
            codec: codec.expect("decoded above"),
            len,
        },
        _ => Frame::XbzrlePages {
            first_page,
            count,
            len,
        },
    })
}

fn read_body(r: &mut impl Read, h: Header, lim: Option<&Limits>) -> Result<Frame, ProtocolError> {
    match (h.kind, lim) {
        (k, Some(l)) if k.is_run() => return read_run(r, &h, l),
        (k, None) if k.is_run() => {
            return Err(unexpected(k, "a control frame (no page limits negotiated)"));
        }
        _ => {}
    }
    check_control_len(&h)?;
    // Capped by check_control_len at MAX_CONTROL_PAYLOAD.
    let mut p = vec![0u8; usize::try_from(h.len).unwrap_or(0)];
    read_in(r, &mut p, h.kind, 0)?;
    decode_control(&h, p, lim).map(Frame::Message)
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

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Message(m) => m.kind(),
            Frame::Pages { .. } => Kind::Pages,
            Frame::Digests { .. } => Kind::Digests,
            Frame::ZeroPages { .. } => Kind::ZeroPages,
            Frame::Discard { .. } => Kind::Discard,
            Frame::CompressedPages { .. } => Kind::CompressedPages,
            Frame::XbzrlePages { .. } => Kind::XbzrlePages,
        }
    }
}

/// Reads a control message of kind `expected`; an `Abort` becomes
/// [`ProtocolError::Aborted`], anything else [`ProtocolError::Unexpected`].
pub fn expect_message(
    r: &mut impl Read,
    limits: Option<&Limits>,
    expected: Kind,
) -> Result<Message, ProtocolError> {
    match read_frame(r, limits)? {
        Frame::Message(Message::Abort(why)) if expected != Kind::Abort => {
            Err(ProtocolError::Aborted(why))
        }
        Frame::Message(m) if m.kind() == expected => Ok(m),
        f => Err(unexpected(f.kind(), expected)),
    }
}

/// Reads the first frame on a fresh connection and insists it is `expected`
/// (Hello or HelloAck) with the right magic and version. A header that does
/// not decode (garbage, another service) gives `NotLivemig`; an `Abort`
/// gives `Aborted`.
pub fn read_handshake(r: &mut impl Read, expected: Kind) -> Result<Message, ProtocolError> {
    let got = read_header(r)?;
    let h = Header::decode(got).map_err(|_| ProtocolError::NotLivemig { got })?;
    if h.kind != expected && h.kind != Kind::Abort {
        return Err(unexpected(h.kind, expected));
    }
    match read_body(r, h, None)? {
        Frame::Message(Message::Abort(why)) => Err(ProtocolError::Aborted(why)),
        Frame::Message(m) => Ok(m),
        f => Err(unexpected(f.kind(), expected)),
    }
}

fn run_frame_header(kind: Kind, first_page: u64, count: u32, len: u64) -> [u8; 24] {
    let len = u32::try_from(len).expect("run frame length fits in u32");
    let flags = 0;
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&Header { kind, flags, len }.encode());
    b[8..16].copy_from_slice(&first_page.to_le_bytes());
    b[16..20].copy_from_slice(&count.to_le_bytes());
    b
}

/// Header + run header of a ZeroPages marker (the whole frame).
pub fn zero_frame_header(first_page: u64, count: u32) -> [u8; 24] {
    run_frame_header(Kind::ZeroPages, first_page, count, RUN_HEADER_LEN as u64)
}

/// Header + run header of a Discard frame (the whole frame).
pub fn discard_frame_header(first_page: u64, count: u32) -> [u8; 24] {
    run_frame_header(Kind::Discard, first_page, count, RUN_HEADER_LEN as u64)
}

/// Header + run header of a CompressedPages frame; `len` compressed bytes follow.
pub fn compressed_frame_header(first_page: u64, count: u32, codec: Codec, len: u32) -> [u8; 24] {
    let total = u64::from(len) + RUN_HEADER_LEN as u64;
    let mut b = run_frame_header(Kind::CompressedPages, first_page, count, total);
    b[20..24].copy_from_slice(&codec.wire_id().to_le_bytes());
    b
}

/// Header + run header of an XbzrlePages frame; `len` bytes of (u16 length,
/// delta) per page follow.
pub fn xbzrle_frame_header(first_page: u64, count: u32, len: u32) -> [u8; 24] {
    let total = u64::from(len) + RUN_HEADER_LEN as u64;
    run_frame_header(Kind::XbzrlePages, first_page, count, total)
}

/// Header + run header for a Pages frame; `count*page_size` page bytes follow.
/// Panics if the frame length overflows u32 (impossible within the limits).
pub fn pages_frame_header(first_page: u64, count: u32, page_size: u32) -> [u8; 24] {
    let len = u64::from(count) * u64::from(page_size) + RUN_HEADER_LEN as u64;
    run_frame_header(Kind::Pages, first_page, count, len)
}

/// Header + run header for a Digests frame; `count` u64 LE digests follow.
pub fn digests_frame_header(first_page: u64, count: u32) -> [u8; 24] {
    let len = u64::from(count) * 8 + RUN_HEADER_LEN as u64;
    run_frame_header(Kind::Digests, first_page, count, len)
}

/// Encodes and writes one control message, refusing an invalid `DeviceState` size.
/// Writes one frame; returns its length on the wire (header included).
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<usize, ProtocolError> {
    if let Message::DeviceState(blob) = m {
        let (kind, len) = (
            Kind::DeviceState,
            u64::try_from(blob.len()).unwrap_or(u64::MAX),
        );
        if blob.len() > MAX_CONTROL_PAYLOAD {
            return Err(too_large(kind, len, MAX_CONTROL_PAYLOAD));
        }
        if blob.is_empty() {
            return Err(bad_len(kind, 0, "at least 1"));
        }
    }
    let frame = m.encode();
    w.write_all(&frame).map_err(ProtocolError::Io)?;
    Ok(frame.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolError as E;

    const L: Limits = Limits {
        streams: 1,
        page_size: 4096,
        page_count: 65536,
    };
    const LIM: Option<&Limits> = Some(&L);

    fn read(bytes: &[u8], limits: Option<&Limits>) -> Result<Frame, ProtocolError> {
        read_frame(&mut &bytes[..], limits)
    }

    fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        [
            &kind.to_le_bytes()[..],
            &flags.to_le_bytes(),
            &len.to_le_bytes(),
            payload,
        ]
        .concat()
    }

    /// A Pages (kind 4) or Digests (kind 8) frame: run header + `extra` zero bytes.
    fn run(kind: u16, first: u64, count: u32, reserved: u32, extra: usize) -> Vec<u8> {
        let head = [
            &first.to_le_bytes()[..],
            &count.to_le_bytes(),
            &reserved.to_le_bytes(),
        ];
        let mut v = head.concat();
        v.resize(16 + extra, 0);
        frame(kind, 0, &v)
    }

    /// `result => Variant pattern, "text the message must contain";` per line.
    macro_rules! rejects {
        ($($result:expr => $pat:pat, $text:expr;)+) => {$({
            let e = $result.expect_err("should be rejected");
            assert!(matches!(e, $pat), "wrong variant: {e:?}");
            assert!(e.to_string().contains($text), "{e} does not contain {:?}", $text);
        })+};
    }

    #[test]
    fn abort_reasons_cannot_drive_a_terminal() {
        let m = Message::abort("disk full\nError: lies\x1b[31m");
        let Frame::Message(Message::Abort(r)) = read(&m.encode(), None).unwrap() else {
            panic!()
        };
        assert_eq!(r, "disk full\\nError: lies\\u{1b}[31m");
    }

    #[test]
    fn messages_round_trip() {
        let all = [
            Message::hello(4096, 1 << 30, 4, 0x0123_4567_89ab_cdef),
            Message::hello_ack(),
            Message::stream_hello(3, 0x0123_4567_89ab_cdef),
            Message::Hello(Hello {
                postcopy: true,
                ..Hello {
                    version: VERSION,
                    page_size: 4096,
                    memory_bytes: 8192,
                    streams: 1,
                    session: 9,
                    postcopy: false,
                }
            }),
            Message::page_request(65535, 1, 0),
            Message::page_request(100, 31, 15),
            Message::round_start(0, false),
            Message::round_start(7, true),
            Message::round_end(3, 12345),
            Message::round_ack(3),
            Message::device_state(vec![1, 2, 3]),
            Message::resumed(1_500_000, 262_144),
            Message::complete(),
            Message::verdict(65536, 0, None),
            Message::verdict(65530, 6, Some(17)),
            Message::abort("guest died: ünïcode"),
            Message::abort(""),
        ];
        for m in all {
            let mut buf = Vec::new();
            write_message(&mut buf, &m).unwrap();
            assert_eq!(read(&buf, None).unwrap(), Frame::Message(m.clone()));
            assert_eq!(read(&buf, LIM).unwrap(), Frame::Message(m));
        }
        let long = Message::abort("é".repeat(3000)).encode();
        let Frame::Message(Message::Abort(r)) = read(&long, None).unwrap() else {
            panic!()
        };
        assert_eq!(r.len(), MAX_ABORT_REASON);
    }

    #[test]
    fn run_headers_round_trip() {
        let v = [&pages_frame_header(100, 2, 4096)[..], &[7u8; 8192]].concat();
        let mut r = &v[..];
        let f = read_frame(&mut r, LIM).unwrap();
        assert_eq!(
            f,
            Frame::Pages {
                first_page: 100,
                count: 2
            }
        );
        let mut pages = vec![0u8; 8192];
        read_bulk(&mut r, &mut pages, Kind::Pages).unwrap();
        assert!(pages.iter().all(|&b| b == 7) && r.is_empty());

        let d = [1u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat();
        let v = [&digests_frame_header(65534, 2)[..], &d].concat();
        let mut r = &v[..];
        let f = read_frame(&mut r, LIM).unwrap();
        assert_eq!(
            f,
            Frame::Digests {
                first_page: 65534,
                count: 2
            }
        );
        assert_eq!(read_digests(&mut r, 2).unwrap(), vec![1, u64::MAX]);
    }

    #[test]
    fn kinds_and_headers_round_trip() {
        for v in 1..=18u16 {
            let kind = Kind::try_from(v).unwrap();
            assert_eq!(kind as u16, v);
            let flags = if kind == Kind::RoundStart {
                FLAG_STOP_AND_COPY
            } else {
                0
            };
            let h = Header {
                kind,
                flags,
                len: 0x0102_0304,
            };
            let b = h.encode();
            assert_eq!(&b[4..], &[4, 3, 2, 1], "little-endian length");
            assert_eq!(Header::decode(b).unwrap(), h);
        }
    }

    #[test]
    fn header_rejections() {
        rejects! {
            read(&frame(0, 0, &[]), LIM) => E::InvalidKind, "frame kind 0 is reserved";
            read(&frame(99, 0, &[]), LIM) => E::UnknownKind(99), "unknown frame kind 99";
            read(&frame(9, 2, &[]), LIM) => E::BadFlags { .. },
                "Complete: unknown flag bits 0x0002";
            read(&frame(3, 2, &[0; 8]), LIM) => E::BadFlags { .. }, "RoundStart: unknown flag bits";
        }
        let mut flagged = run(4, 0, 1, 0, 4096);
        flagged[2] = 1;
        rejects! { read(&flagged, LIM) => E::BadFlags { .. }, "Pages: unknown flag bits 0x0001"; }
    }

    #[test]
    fn handshake_rejections() {
        let mut bad = Message::hello(4096, 1 << 20, 1, 0).encode();
        bad[8] = b'X';
        let v7 = Message::Hello(Hello {
            version: 7,
            page_size: 4096,
            memory_bytes: 4096,
            streams: 1,
            session: 0,
            postcopy: false,
        })
        .encode();
        // A longer (future) Hello still reports the version, not the length.
        let mut v3 = [&MAGIC[..], &3u32.to_le_bytes(), &[0; 40]].concat();
        let v3_frame = frame(1, 0, &v3);
        v3[8] = 2;
        let mut reserved_hello = Message::hello(4096, 8192, 1, 0).encode();
        reserved_hello[8 + 28] = 2; // flag bits other than POSTCOPY
        let mut ack = Message::hello_ack().encode();
        ack[20] = 1;
        let garbage = b"HTTP/1.1 400 Bad Request\r\n";
        let hello = Message::hello(4096, 8192, 1, 0).encode();
        let abort = Message::abort("no room").encode();
        let end = Message::round_end(0, 0).encode();
        rejects! {
            read(&bad, None) => E::NotLivemig { .. }, "not a livemig peer (bad magic 0x58";
            read(&v7, None) => E::Version { peer: 7 },
                "peer speaks protocol version 7, this build speaks 2";
            read(&v3_frame, None) => E::Version { peer: 3 }, "version 3";
            read(&frame(1, 0, &v3), None) => E::BadLength { .. },
                "Hello: payload of 52 bytes, expected 40";
            read(&reserved_hello, None) => E::Reserved { value: 2, .. },
                "Hello: reserved field is 0x2";
            read(&frame(2, 0, &MAGIC), None) => E::BadLength { .. }, "HelloAck: payload of 8 bytes";
            read(&ack, None) => E::Reserved { value: 1, .. }, "HelloAck: reserved field is 0x1";
            read_handshake(&mut &garbage[..], Kind::HelloAck) => E::NotLivemig { .. },
                "not a livemig peer (bad magic 0x485454502f312e31 \"HTTP/1.1\")";
            read_handshake(&mut &hello[..], Kind::HelloAck) => E::Unexpected { .. },
                "unexpected frame Hello (expected HelloAck)";
            read_handshake(&mut &abort[..], Kind::HelloAck) => E::Aborted(_),
                "peer aborted: no room";
            read_handshake(&mut &end[..], Kind::Hello) => E::Unexpected { .. },
                "unexpected frame RoundEnd (expected Hello)";
            read_handshake(&mut &[][..], Kind::Hello) => E::Closed, "connection closed by peer";
        }
        let Ok(Message::Hello(h)) = read_handshake(&mut &hello[..], Kind::Hello) else {
            panic!()
        };
        let l = h.limits().unwrap();
        assert_eq!((l.page_size, l.page_count), (4096, 2));
    }

    #[test]
    fn hello_limits() {
        let h = |page_size, memory_bytes| Hello {
            version: VERSION,
            page_size,
            memory_bytes,
            streams: 1,
            session: 0,
            postcopy: false,
        };
        rejects! {
            h(1000, 4000).limits() => E::BadHello(_), "page size 1000 is not a power of two";
            h(2048, 4096).limits() => E::BadHello(_), "page size 2048";
            h(1 << 17, 1 << 17).limits() => E::BadHello(_), "page size 131072";
            h(4096, 0).limits() => E::BadHello(_), "memory size 0 bytes";
            h(4096, 5000).limits() => E::BadHello(_), "memory size 5000 bytes";
            Hello { version: 7, ..h(4096, 4096) }.limits() => E::Version { peer: 7 }, "version 7";
            Hello { streams: 0, ..h(4096, 4096) }.limits() => E::BadHello(_), "0 streams";
            Hello { streams: 65, ..h(4096, 4096) }.limits() => E::BadHello(_),
                "65 streams, outside 1..=64";
        }
    }

    #[test]
    fn control_rejections() {
        let mut big = frame(6, 0, &[]);
        big[4..8].copy_from_slice(&5_000_000u32.to_le_bytes());
        let mut rs = Message::round_start(1, false).encode();
        rs[12] = 1;
        let huge = Message::device_state(vec![0; MAX_CONTROL_PAYLOAD + 1]);
        rejects! {
            read(&frame(3, 0, &[0; 9]), LIM) => E::BadLength { .. },
                "RoundStart: payload of 9 bytes, expected 8";
            read(&frame(9, 0, &[0]), LIM) => E::BadLength { .. },
                "Complete: payload of 1 bytes, expected 0";
            read(&big, LIM) => E::TooLarge { .. },
                "frame DeviceState: payload of 5000000 bytes exceeds the cap of 1048576";
            read(&frame(6, 0, &[]), LIM) => E::BadLength { .. }, "DeviceState: payload of 0 bytes";
            read(&frame(11, 0, &[b'a'; 4097]), LIM) => E::TooLarge { .. }, "Abort: payload of 4097";
            read(&rs, LIM) => E::Reserved { value: 1, .. }, "RoundStart: reserved field is 0x1";
            read(&Message::verdict(1, 0, Some(70000)).encode(), LIM) => E::BadField { .. },
                "first mismatch 70000";
            read(&Message::verdict(u64::MAX - 1, 5, None).encode(), LIM) => E::BadField { .. },
                "5 mismatched";
            write_message(&mut Vec::new(), &huge) => E::TooLarge { .. }, "1048577 bytes";
        }
    }

    #[test]
    fn run_rejections() {
        rejects! {
            read(&run(4, 0, 0, 0, 0), LIM) => E::BadCount { count: 0, .. },
                "Pages: count 0 outside 1..=1024";
            read(&run(4, 0, 1025, 0, 0), LIM) => E::BadCount { count: 1025, .. }, "count 1025";
            read(&run(4, 65530, 10, 0, 0), LIM) => E::OutOfRange { .. },
                "frame Pages: page run 65530+10 out of range (memory has 65536 pages)";
            read(&run(4, u64::MAX - 1, 4, 0, 0), LIM) => E::OutOfRange { .. },
                "page run 18446744073709551614+4 out of range";
            read(&run(4, 0, 1, 0, 4095), LIM) => E::BadLength { .. },
                "Pages: payload of 4111 bytes, expected 16 + 1*4096 = 4112";
            read(&run(4, 0, 1, 5, 4096), LIM) => E::Reserved { value: 5, .. },
                "reserved field is 0x5";
            read(&frame(4, 0, &[0; 8]), LIM) => E::BadLength { .. }, "Pages: payload of 8 bytes";
            read(&run(8, 0, 2, 0, 24), LIM) => E::BadLength { .. }, "Digests: payload of 40 bytes";
            read(&run(8, 0, MAX_DIGESTS + 1, 0, 0), LIM) => E::BadCount { .. },
                "count 65537 outside";
            read(&run(8, 65535, 2, 0, 16), LIM) => E::OutOfRange { .. },
                "Digests: page run 65535+2";
            read(&run(4, 0, 1, 0, 4096), None) => E::Unexpected { .. }, "unexpected frame Pages";
            read(&run(8, 0, 1, 0, 8), None) => E::Unexpected { .. }, "unexpected frame Digests";
        }
    }

    #[test]
    fn reduced_runs_round_trip_and_are_checked() {
        let frames = [
            (
                zero_frame_header(7, 60_000).to_vec(),
                Frame::ZeroPages {
                    first_page: 7,
                    count: 60_000,
                },
            ),
            (
                [
                    &compressed_frame_header(3, 4, Codec::Zstd, 100)[..],
                    &[0; 100],
                ]
                .concat(),
                Frame::CompressedPages {
                    first_page: 3,
                    count: 4,
                    codec: Codec::Zstd,
                    len: 100,
                },
            ),
            (
                [&xbzrle_frame_header(9, 2, 6)[..], &[0; 6]].concat(),
                Frame::XbzrlePages {
                    first_page: 9,
                    count: 2,
                    len: 6,
                },
            ),
        ];
        for (bytes, want) in frames {
            let mut r = &bytes[..];
            assert_eq!(read_frame(&mut r, LIM).unwrap(), want);
        }
        let lz4 = Codec::Lz4.wire_id();
        rejects! {
            read(&run(14, 0, 1, 0, 1), LIM) => E::BadLength { .. },
                "ZeroPages: payload of 17 bytes, expected 16";
            read(&run(14, 65000, 537, 0, 0), LIM) => E::OutOfRange { .. }, "65000+537";
            read(&run(14, 0, 1, 2, 0), LIM) => E::Reserved { value: 2, .. }, "reserved";
            read(&run(15, 0, 1, 0, 10), LIM) => E::BadField { .. },
                "CompressedPages: unknown codec 0";
            read(&run(15, 0, 1, 9, 10), LIM) => E::BadField { .. }, "unknown codec 9";
            read(&run(15, 0, 1, lz4, 4096), LIM) => E::BadLength { .. },
                "CompressedPages: payload of 4112 bytes, expected 16 + 1..4096";
            read(&run(15, 0, 1, lz4, 0), LIM) => E::BadLength { .. }, "payload of 16 bytes";
            read(&run(15, 0, 1025, lz4, 10), LIM) => E::BadCount { .. }, "count 1025";
            read(&run(16, 0, 2, 0, 3), LIM) => E::BadLength { .. },
                "XbzrlePages: payload of 19 bytes, expected 16 + 4..=8194";
            read(&run(16, 0, 1, 0, 4098), LIM) => E::BadLength { .. }, "4114 bytes";
            read(&run(16, 0, 1, 0, 4), None) => E::Unexpected { .. },
                "unexpected frame XbzrlePages";
            read(&Message::page_request(0, 4, 4).encode(), LIM) => E::BadField { .. },
                "PageRequest: faulted page 4 outside the run of 4";
            read(&Message::page_request(65534, 4, 0).encode(), LIM) => E::OutOfRange { .. },
                "PageRequest: page run 65534+4";
            read(&Message::page_request(0, 1025, 0).encode(), LIM) => E::BadCount { .. },
                "count 1025";
        }
    }

    #[test]
    fn truncation_and_close() {
        let hdr = pages_frame_header(0, 1, 4096);
        let end = Message::round_end(1, 2).encode();
        rejects! {
            read(&[], LIM) => E::Closed, "connection closed by peer";
            read(&[4, 0, 0], LIM) => E::Truncated { .. },
                "inside a frame header (needed 5 more bytes)";
            read(&hdr[..8], LIM) => E::Truncated { .. },
                "truncated stream: connection closed inside a Pages frame (needed 4112 more bytes)";
            read(&end[..12], LIM) => E::Truncated { .. }, "a RoundEnd frame (needed 12 more bytes)";
        }
        let mut r = &hdr[..];
        read_frame(&mut r, LIM).unwrap();
        let mut buf = vec![0u8; 4096];
        rejects! {
            read_bulk(&mut r, &mut buf, Kind::Pages) => E::Truncated { .. }, "needed 4096 more";
        }
        let two = [Message::complete().encode(), Message::complete().encode()].concat();
        let mut r = &two[..];
        expect_message(&mut r, LIM, Kind::Complete).unwrap();
        rejects! {
            expect_message(&mut r, None, Kind::Verdict) => E::Unexpected { .. },
                "unexpected frame Complete (expected Verdict)";
            read_frame(&mut r, LIM) => E::Closed, "closed";
        }
    }

    /// Hex of `bytes`, for golden comparisons.
    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The exact bytes of one frame of every kind. These must never change
    /// without a protocol version bump.
    #[test]
    fn golden_bytes() {
        const BIG: Limits = Limits {
            streams: 1,
            page_size: 4096,
            page_count: 1 << 60,
        };
        let control = [
            (
                Message::hello(4096, 1 << 30, 4, 0x0123_4567_89ab_cdef),
                "0100000028000000 4c4956454d494700 02000000 00100000 0000004000000000 \
                 04000000 00000000 efcdab8967452301",
            ),
            (
                Message::Hello(Hello {
                    version: VERSION,
                    page_size: 65536,
                    memory_bytes: 0x0000_0102_0304_0000,
                    streams: 1,
                    session: 9,
                    postcopy: true,
                }),
                "0100000028000000 4c4956454d494700 02000000 00000100 0000040302010000 \
                 01000000 01000000 0900000000000000",
            ),
            (
                Message::hello_ack(),
                "0200000010000000 4c4956454d494700 02000000 00000000",
            ),
            (
                Message::stream_hello(REQUEST_STREAM, 0x0123_4567_89ab_cdef),
                "0d00000018000000 4c4956454d494700 02000000 ffffffff efcdab8967452301",
            ),
            (
                Message::round_start(0x0102_0304, false),
                "0300000008000000 04030201 00000000",
            ),
            (
                Message::round_start(7, true),
                "0300010008000000 07000000 00000000",
            ),
            (
                Message::page_request(0x0102_0304_0506_0708, 31, 15),
                "1200000010000000 0807060504030201 1f000000 0f000000",
            ),
            (
                Message::round_end(3, 0x0102_0304_0506_0708),
                "0500000010000000 03000000 00000000 0807060504030201",
            ),
            (
                Message::round_ack(0x0a0b_0c0d),
                "0c00000008000000 0d0c0b0a 00000000",
            ),
            (
                Message::device_state(vec![1, 2, 3]),
                "0600000003000000 010203",
            ),
            (
                Message::resumed(1_500_000, 262_144),
                "0700000010000000 60e3160000000000 0000040000000000",
            ),
            (Message::complete(), "0900000000000000"),
            (
                Message::verdict(65536, 0, None),
                "0a00000018000000 0000010000000000 0000000000000000 ffffffffffffffff",
            ),
            (
                Message::verdict(65530, 6, Some(17)),
                "0a00000018000000 faff000000000000 0600000000000000 1100000000000000",
            ),
            (Message::abort("no room"), "0b00000007000000 6e6f20726f6f6d"),
        ];
        for (m, want) in control {
            let want = want.replace(' ', "");
            assert_eq!(hex(&m.encode()), want, "{m:?}");
            assert_eq!(read(&unhex(&want), Some(&BIG)).unwrap(), Frame::Message(m));
        }
        // Run frames: the header and run header (what follows is raw bulk).
        let runs = [
            (
                pages_frame_header(0x0102_0304_0506_0708, 2, 4096),
                Frame::Pages {
                    first_page: 0x0102_0304_0506_0708,
                    count: 2,
                },
                "0400000010200000 0807060504030201 02000000 00000000",
            ),
            (
                digests_frame_header(65534, 2),
                Frame::Digests {
                    first_page: 65534,
                    count: 2,
                },
                "0800000020000000 feff000000000000 02000000 00000000",
            ),
            (
                zero_frame_header(7, 60_000),
                Frame::ZeroPages {
                    first_page: 7,
                    count: 60_000,
                },
                "0e00000010000000 0700000000000000 60ea0000 00000000",
            ),
            (
                discard_frame_header(0x0a0b, 256),
                Frame::Discard {
                    first_page: 0x0a0b,
                    count: 256,
                },
                "1100000010000000 0b0a000000000000 00010000 00000000",
            ),
            (
                compressed_frame_header(3, 4, Codec::Lz4, 100),
                Frame::CompressedPages {
                    first_page: 3,
                    count: 4,
                    codec: Codec::Lz4,
                    len: 100,
                },
                "0f00000074000000 0300000000000000 04000000 01000000",
            ),
            (
                compressed_frame_header(3, 4, Codec::Zstd, 0x0102),
                Frame::CompressedPages {
                    first_page: 3,
                    count: 4,
                    codec: Codec::Zstd,
                    len: 0x0102,
                },
                "0f00000012010000 0300000000000000 04000000 02000000",
            ),
            (
                xbzrle_frame_header(9, 2, 6),
                Frame::XbzrlePages {
                    first_page: 9,
                    count: 2,
                    len: 6,
                },
                "1000000016000000 0900000000000000 02000000 00000000",
            ),
        ];
        for (bytes, frame, want) in runs {
            let want = want.replace(' ', "");
            assert_eq!(hex(&bytes), want, "{frame:?}");
            assert_eq!(read(&unhex(&want), Some(&BIG)).unwrap(), frame);
        }
        let header = Header {
            kind: Kind::PageRequest,
            flags: 0,
            len: 0x0102_0304,
        };
        assert_eq!(hex(&header.encode()), "1200000004030201");
    }
}
