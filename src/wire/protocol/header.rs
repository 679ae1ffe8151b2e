//! The frame header every frame starts with, the kinds it names, the limits
//! a migration negotiates, and everything that can go wrong on the wire.

use std::fmt;
use std::io;

use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First 8 bytes of every `Hello`, `HelloAck`, `StreamHello` and `AuthHello` payload.
pub const MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// Protocol version spoken by this build.
pub const VERSION: u32 = 4;
/// Size of the frame header.
pub const HEADER_LEN: usize = size_of::<HeaderLayout>();
/// Cap on the payload of any frame other than the run frames.
pub const MAX_CONTROL_PAYLOAD: usize = 1 << 20;
/// Maximum pages in one `Pages`, `CompressedPages` or `XbzrlePages` frame.
pub const MAX_RUN_PAGES: u32 = 1024;
/// Most data connections a migration may use.
pub const MAX_STREAMS: u32 = 64;
/// Maximum digests in one `Digests` frame.
pub const MAX_DIGESTS: u32 = 65536;
/// Maximum length of an `Abort` reason in bytes.
pub const MAX_ABORT_REASON: usize = 4096;
/// `RoundStart` flag: this round runs with the guest paused.
pub const FLAG_STOP_AND_COPY: u16 = 1;
/// `Hello` flag: a post-copy migration (a request connection follows).
pub const HELLO_POSTCOPY: u32 = 1;
/// `StreamHello` index of the post-copy request connection.
pub const REQUEST_STREAM: u32 = u32::MAX;
/// `AuthHello` connection index of the control connection.
pub const CONTROL_STREAM: u32 = u32::MAX - 1;
/// Smallest accepted page size (page sizes are powers of two).
pub const MIN_PAGE_SIZE: u32 = crate::util::page::PageSize::MIN.as_u32();
/// Largest accepted page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// A protocol error and what its side was doing when it happened: the
/// context both ends give the errors of their connections.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct InContext {
    pub context: String,
    #[source]
    pub source: ProtocolError,
}

/// Everything that can go wrong on the wire; each message is one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer is not a livemig peer (bad magic {})", show_magic(.got))]
    NotLivemig { got: [u8; 8] },
    /// (Only a receiver meets the next three: a sender speaks first.)
    #[error("the sender speaks TLS and this receiver does not: give both ends --tls-ca, --tls-cert and --tls-key")]
    TlsPeer,
    #[error("the sender authenticates with a pre-shared key and this receiver has none: give both ends the same --psk FILE")]
    PskPeer,
    #[error("the sender did not authenticate, and this receiver requires a pre-shared key: give both ends the same --psk FILE")]
    NoPsk,
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

pub(super) fn reserved(kind: Kind, value: u64) -> Result<(), ProtocolError> {
    if value != 0 {
        return Err(ProtocolError::Reserved { kind, value });
    }
    Ok(())
}

pub(super) fn bad_len(kind: Kind, len: u64, expected: impl fmt::Display) -> ProtocolError {
    let expected = expected.to_string();
    ProtocolError::BadLength {
        kind,
        len,
        expected,
    }
}

pub(super) fn too_large(kind: Kind, len: u64, cap: usize) -> ProtocolError {
    let cap = u64::try_from(cap).unwrap_or(u64::MAX);
    ProtocolError::TooLarge { kind, len, cap }
}

pub(super) fn unexpected(got: Kind, expected: impl fmt::Display) -> ProtocolError {
    let expected = expected.to_string();
    ProtocolError::Unexpected { got, expected }
}

/// Declares [`Kind`] and its decoding from one list, so a number and its
/// kind are written once.
macro_rules! kinds {
    ($($name:ident = $value:literal,)+) => {
        /// Frame kinds. Kind 0 is reserved as invalid.
        #[repr(u16)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind {
            Invalid = 0,
            $($name = $value,)+
        }

        impl TryFrom<u16> for Kind {
            type Error = ProtocolError;
            fn try_from(v: u16) -> Result<Kind, ProtocolError> {
                match v {
                    0 => Err(ProtocolError::InvalidKind),
                    $($value => Ok(Kind::$name),)+
                    _ => Err(ProtocolError::UnknownKind(v)),
                }
            }
        }
    };
}

kinds! {
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
    AuthHello = 19,
    AuthChallenge = 20,
    AuthProof = 21,
    TeleportOffer = 22,
    TeleportAck = 23,
    TeleportMap = 24,
    TeleportSync = 25,
    TeleportDone = 26,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Kind {
    /// The flag bits a frame of this kind may carry.
    fn allowed_flags(self) -> u16 {
        match self {
            Kind::RoundStart => FLAG_STOP_AND_COPY,
            _ => 0,
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

/// The header as it travels.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(super) struct HeaderLayout {
    kind: U16<LE>,
    flags: U16<LE>,
    len: U32<LE>,
}

impl Header {
    pub(super) fn layout(&self) -> HeaderLayout {
        HeaderLayout {
            kind: U16::new(self.kind as u16),
            flags: U16::new(self.flags),
            len: U32::new(self.len),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(self.layout())
    }

    /// Decodes and checks kind and flags (lengths are checked by the reader).
    pub fn decode(b: [u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let h: HeaderLayout = zerocopy::transmute!(b);
        let kind = Kind::try_from(h.kind.get())?;
        let (flags, len) = (h.flags.get(), h.len.get());
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
