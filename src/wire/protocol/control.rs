//! Control messages: one struct per message, and per message one
//! implementation of [`Control`] that holds its whole wire form: its kind,
//! its payload layout (a `#[repr(C)]` struct of little-endian fields, read
//! with one `read_from_bytes`, so the length, the encoder and the decoder
//! cannot disagree) and the checks on its fields. The handshakes are in
//! [`super::handshake`]; [`super::message`] gathers them all in [`Message`].
//!
//! [`Message`]: super::message::Message

use zerocopy::byteorder::{LE, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::header::{
    bad_len, reserved, too_large, Kind, Limits, ProtocolError, FLAG_STOP_AND_COPY, MAGIC,
    MAX_ABORT_REASON, MAX_CONTROL_PAYLOAD, MAX_RUN_PAGES, VERSION,
};

/// How long a control payload may be: checked before a byte of it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Exactly the size of a fixed layout.
    Fixed(usize),
    /// A handshake: magic and version first, checked whatever the length
    /// (so a peer of another version is told so), then exactly this size.
    Greeting(usize),
    /// A variable payload of `min..=max` bytes.
    Between { min: usize, max: usize },
}

impl Size {
    /// Checks a payload length announced by a header (or about to be sent).
    pub(super) fn check(self, kind: Kind, len: u64) -> Result<(), ProtocolError> {
        let cap = match self {
            Size::Between { max, .. } => max,
            _ => MAX_CONTROL_PAYLOAD,
        };
        if len > u64::try_from(cap).unwrap_or(u64::MAX) {
            return Err(too_large(kind, len, cap));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        match self {
            Size::Fixed(n) if len != n => Err(bad_len(kind, len as u64, n)),
            Size::Greeting(_) if len < GREETING_LEN => Err(bad_len(
                kind,
                len as u64,
                format!("at least {GREETING_LEN}"),
            )),
            Size::Between { min, .. } if len < min => {
                Err(bad_len(kind, len as u64, format!("at least {min}")))
            }
            _ => Ok(()),
        }
    }
}

/// Magic and version: the first 12 bytes of every handshake, in every version.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub(super) struct Greeting {
    magic: [u8; 8],
    pub(super) version: U32<LE>,
}

const GREETING_LEN: usize = size_of::<Greeting>();

impl Greeting {
    pub(super) fn new(version: u32) -> Greeting {
        let (magic, version) = (MAGIC, U32::new(version));
        Greeting { magic, version }
    }

    /// Checks the magic, then the version, of a payload of at least 12 bytes.
    pub(super) fn check(kind: Kind, p: &[u8]) -> Result<(), ProtocolError> {
        let (g, _) = Greeting::read_from_prefix(p)
            .map_err(|_| bad_len(kind, p.len() as u64, format!("at least {GREETING_LEN}")))?;
        if g.magic != MAGIC {
            return Err(ProtocolError::NotLivemig { got: g.magic });
        }
        match g.version.get() {
            VERSION => Ok(()),
            peer => Err(ProtocolError::Version { peer }),
        }
    }
}

/// One control message type and its wire form.
pub trait Control: Sized {
    const KIND: Kind;
    const SIZE: Size;
    /// Appends the payload to `out`; returns the header's flags.
    fn encode(&self, out: &mut Vec<u8>) -> u16;
    /// Decodes a payload whose length [`Control::SIZE`] admits (and whose
    /// greeting, for a handshake, was checked), checking every field.
    fn decode(flags: u16, payload: Vec<u8>, limits: Option<&Limits>)
        -> Result<Self, ProtocolError>;
}

/// Reads a fixed layout from a payload of (already checked) length.
pub(super) fn layout<L: FromBytes + KnownLayout + Immutable>(
    kind: Kind,
    p: &[u8],
) -> Result<L, ProtocolError> {
    L::read_from_bytes(p).map_err(|_| bad_len(kind, p.len() as u64, size_of::<L>()))
}

/// A round of pages begins (flag [`FLAG_STOP_AND_COPY`]: the guest is paused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundStart {
    pub round: u32,
    pub stop_and_copy: bool,
}

/// The layout of `RoundStart` and `RoundAck`.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RoundLayout {
    round: U32<LE>,
    reserved: U32<LE>,
}

impl RoundLayout {
    fn encode(round: u32, out: &mut Vec<u8>) {
        let (round, reserved) = (U32::new(round), U32::ZERO);
        out.extend_from_slice(RoundLayout { round, reserved }.as_bytes());
    }
    fn decode(kind: Kind, p: &[u8]) -> Result<u32, ProtocolError> {
        let l: RoundLayout = layout(kind, p)?;
        reserved(kind, u64::from(l.reserved.get()))?;
        Ok(l.round.get())
    }
}

impl Control for RoundStart {
    const KIND: Kind = Kind::RoundStart;
    const SIZE: Size = Size::Fixed(size_of::<RoundLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        RoundLayout::encode(self.round, out);
        if self.stop_and_copy {
            FLAG_STOP_AND_COPY
        } else {
            0
        }
    }
    fn decode(flags: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let round = RoundLayout::decode(Self::KIND, &p)?;
        let stop_and_copy = flags & FLAG_STOP_AND_COPY != 0;
        Ok(RoundStart {
            round,
            stop_and_copy,
        })
    }
}

/// The receiver acknowledges a pre-copy round: its pages have all landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundAck {
    pub round: u32,
}

impl Control for RoundAck {
    const KIND: Kind = Kind::RoundAck;
    const SIZE: Size = Size::Fixed(size_of::<RoundLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        RoundLayout::encode(self.round, out);
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let round = RoundLayout::decode(Self::KIND, &p)?;
        Ok(RoundAck { round })
    }
}

/// A round (or one data connection's share of it) ends after `pages` pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RoundEndLayout {
    round: U32<LE>,
    reserved: U32<LE>,
    pages: U64<LE>,
}

impl Control for RoundEnd {
    const KIND: Kind = Kind::RoundEnd;
    const SIZE: Size = Size::Fixed(size_of::<RoundEndLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = RoundEndLayout {
            round: U32::new(self.round),
            reserved: U32::ZERO,
            pages: U64::new(self.pages),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: RoundEndLayout = layout(Self::KIND, &p)?;
        reserved(Self::KIND, u64::from(l.reserved.get()))?;
        let (round, pages) = (l.round.get(), l.pages.get());
        Ok(RoundEnd { round, pages })
    }
}

/// The destination asks for a run of pages around one its guest faulted
/// on, `fault` pages into the run (that one first, please).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub first_page: u64,
    pub count: u32,
    pub fault: u32,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PageRequestLayout {
    first_page: U64<LE>,
    count: U32<LE>,
    fault: U32<LE>,
}

impl Control for PageRequest {
    const KIND: Kind = Kind::PageRequest;
    const SIZE: Size = Size::Fixed(size_of::<PageRequestLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = PageRequestLayout {
            first_page: U64::new(self.first_page),
            count: U32::new(self.count),
            fault: U32::new(self.fault),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, lim: Option<&Limits>) -> Result<Self, ProtocolError> {
        let kind = Self::KIND;
        let l: PageRequestLayout = layout(kind, &p)?;
        let (first_page, count, fault) = (l.first_page.get(), l.count.get(), l.fault.get());
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
        Ok(PageRequest {
            first_page,
            count,
            fault,
        })
    }
}

/// The guest's device state, opaque to the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState(pub Vec<u8>);

impl Control for DeviceState {
    const KIND: Kind = Kind::DeviceState;
    const SIZE: Size = Size::Between {
        min: 1,
        max: MAX_CONTROL_PAYLOAD,
    };
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        out.extend_from_slice(&self.0);
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        Ok(DeviceState(p))
    }
}

/// The destination guest runs: downtime ends here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    pub resume_ns: u64,
    pub pages_received: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ResumedLayout {
    resume_ns: U64<LE>,
    pages_received: U64<LE>,
}

impl Control for Resumed {
    const KIND: Kind = Kind::Resumed;
    const SIZE: Size = Size::Fixed(size_of::<ResumedLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = ResumedLayout {
            resume_ns: U64::new(self.resume_ns),
            pages_received: U64::new(self.pages_received),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: ResumedLayout = layout(Self::KIND, &p)?;
        Ok(Resumed {
            resume_ns: l.resume_ns.get(),
            pages_received: l.pages_received.get(),
        })
    }
}

/// The digests are all sent: the verdict, please.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Complete;

impl Control for Complete {
    const KIND: Kind = Kind::Complete;
    const SIZE: Size = Size::Fixed(0);
    fn encode(&self, _: &mut Vec<u8>) -> u16 {
        0
    }
    fn decode(_: u16, _: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        Ok(Complete)
    }
}

/// The destination's comparison of the source's digests with its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    pub first_mismatch: Option<u64>,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct VerdictLayout {
    verified_pages: U64<LE>,
    mismatched_pages: U64<LE>,
    /// `u64::MAX`: none.
    first_mismatch: U64<LE>,
}

impl Control for Verdict {
    const KIND: Kind = Kind::Verdict;
    const SIZE: Size = Size::Fixed(size_of::<VerdictLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = VerdictLayout {
            verified_pages: U64::new(self.verified_pages),
            mismatched_pages: U64::new(self.mismatched_pages),
            first_mismatch: U64::new(self.first_mismatch.unwrap_or(u64::MAX)),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, lim: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: VerdictLayout = layout(Self::KIND, &p)?;
        let (ok, bad, first) = (
            l.verified_pages.get(),
            l.mismatched_pages.get(),
            l.first_mismatch.get(),
        );
        let first_mismatch = (first != u64::MAX).then_some(first);
        // A first mismatch exactly when there are mismatches.
        if first_mismatch.is_some() != (bad > 0) {
            return Err(ProtocolError::BadField {
                kind: Self::KIND,
                detail: format!(
                    "{bad} mismatched pages but {} first mismatch",
                    if first_mismatch.is_some() { "a" } else { "no" }
                ),
            });
        }
        if let Some(l) = lim {
            let n = l.page_count;
            let too_many = ok.checked_add(bad).is_none_or(|t| t > n);
            if too_many || first_mismatch.is_some_and(|f| f >= n) {
                let detail = format!(
                    "{ok} verified + {bad} mismatched pages (first mismatch {first}) \
                     do not fit in memory of {n} pages"
                );
                return Err(ProtocolError::BadField {
                    kind: Self::KIND,
                    detail,
                });
            }
        }
        Ok(Verdict {
            verified_pages: ok,
            mismatched_pages: bad,
            first_mismatch,
        })
    }
}

/// Either side gives up, saying why (cut to [`MAX_ABORT_REASON`] bytes on
/// encode; control characters escaped on decode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort(pub String);

impl Control for Abort {
    const KIND: Kind = Kind::Abort;
    const SIZE: Size = Size::Between {
        min: 0,
        max: MAX_ABORT_REASON,
    };
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let reason = &self.0;
        let mut end = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&reason.as_bytes()[..end]);
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        // A peer's words end up on a terminal: escape control characters.
        let reason = String::from_utf8_lossy(&p);
        Ok(Abort(crate::util::text::printable(
            &reason,
            MAX_ABORT_REASON,
        )))
    }
}
