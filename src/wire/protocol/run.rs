//! Run frames: after the frame header, a 16-byte run header (`first_page:
//! u64, count: u32, field: u32`) and then the bulk, which the caller reads
//! straight into place. What [`super::read_frame`] returns, a [`Frame`],
//! keeps the runs of page data ([`PageRun`]) apart from control messages
//! and from the other runs, so each reader is handed only what it can take.

use zerocopy::byteorder::{LE, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::header::{
    bad_len, reserved, unexpected, Header, HeaderLayout, Kind, Limits, ProtocolError, MAX_DIGESTS,
    MAX_RUN_PAGES,
};
use super::message::Message;
use crate::wire::reduce::Codec;

/// The run header, as it travels.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RunHeader {
    first_page: U64<LE>,
    count: U32<LE>,
    /// `CompressedPages`: the codec; reserved (0) in every other kind.
    field: U32<LE>,
}

/// Size of the run header of a run frame.
pub const RUN_HEADER_LEN: usize = size_of::<RunHeader>();

/// A run frame's header and run header: all of a marker frame, the part
/// before the bulk of the others.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RunFrameHeader {
    header: HeaderLayout,
    run: RunHeader,
}

/// Size of a run frame's headers.
pub const RUN_FRAME_HEADER_LEN: usize = size_of::<RunFrameHeader>();

/// A run of guest pages' contents in one of the four forms the data path
/// sends (see [`crate::wire::datapath`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRun {
    /// `count` raw pages follow.
    Pages { first_page: u64, count: u32 },
    /// The run is all zeros; nothing follows.
    ZeroPages { first_page: u64, count: u32 },
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

impl PageRun {
    pub fn kind(&self) -> Kind {
        match self {
            PageRun::Pages { .. } => Kind::Pages,
            PageRun::ZeroPages { .. } => Kind::ZeroPages,
            PageRun::CompressedPages { .. } => Kind::CompressedPages,
            PageRun::XbzrlePages { .. } => Kind::XbzrlePages,
        }
    }

    /// The run's first page and page count.
    pub fn pages(&self) -> (u64, u32) {
        match *self {
            PageRun::Pages { first_page, count }
            | PageRun::ZeroPages { first_page, count }
            | PageRun::CompressedPages {
                first_page, count, ..
            }
            | PageRun::XbzrlePages {
                first_page, count, ..
            } => (first_page, count),
        }
    }
}

/// What [`super::read_frame`] returns: a control message, or the run header
/// of a run frame whose bulk (page bytes / digests) the caller reads next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    /// Page contents for guest memory.
    Run(PageRun),
    /// `count` u64 digests follow.
    Digests {
        first_page: u64,
        count: u32,
    },
    /// Post-copy: the destination must fetch this run (nothing follows).
    Discard {
        first_page: u64,
        count: u32,
    },
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Message(m) => m.kind(),
            Frame::Run(r) => r.kind(),
            Frame::Digests { .. } => Kind::Digests,
            Frame::Discard { .. } => Kind::Discard,
        }
    }
}

/// The most pages a run frame of `kind` may name; `None` if `kind` is not
/// a run frame.
fn rules(kind: Kind) -> Option<u32> {
    match kind {
        Kind::Pages | Kind::CompressedPages | Kind::XbzrlePages => Some(MAX_RUN_PAGES),
        Kind::Digests => Some(MAX_DIGESTS),
        // A marker costs nothing to receive: any run inside memory will do.
        Kind::ZeroPages | Kind::Discard => Some(u32::MAX),
        _ => None,
    }
}

/// The length of what follows the run header of run frame `h`, checked
/// before the run header is read.
pub(super) fn body_len(h: &Header) -> Result<u64, ProtocolError> {
    const RUN: u64 = RUN_HEADER_LEN as u64;
    let len = u64::from(h.len);
    len.checked_sub(RUN)
        .ok_or_else(|| bad_len(h.kind, len, format!("at least {RUN}")))
}

/// Decodes the run header `b` of run frame `h` and validates it, the
/// frame's length included, against the limits.
pub(super) fn decode(
    h: &Header,
    b: [u8; RUN_HEADER_LEN],
    l: &Limits,
) -> Result<Frame, ProtocolError> {
    let (kind, len, body) = (h.kind, u64::from(h.len), body_len(h)?);
    let Some(max) = rules(kind) else {
        return Err(unexpected(kind, "a run frame"));
    };
    let run: RunHeader = zerocopy::transmute!(b);
    let (first_page, count, field) = (run.first_page.get(), run.count.get(), run.field.get());
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
    if count == 0 || count > max {
        return Err(ProtocolError::BadCount { kind, count, max });
    }
    l.check_run(kind, first_page, count)?;
    const RUN: u64 = RUN_HEADER_LEN as u64;
    let (n, ps) = (u64::from(count), u64::from(l.page_size));
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
        // XbzrlePages: per page a u16 length and a delta shorter than the page.
        _ => (
            (2 * n..=n * (ps + 1)).contains(&body),
            format!("{RUN} + {}..={}", 2 * n, n * (ps + 1)),
        ),
    };
    if !fits {
        return Err(bad_len(kind, len, expected));
    }
    let len = u32::try_from(body).expect("the body is shorter than the u32 frame length");
    Ok(match (kind, codec) {
        (Kind::Pages, _) => Frame::Run(PageRun::Pages { first_page, count }),
        (Kind::ZeroPages, _) => Frame::Run(PageRun::ZeroPages { first_page, count }),
        (Kind::CompressedPages, Some(codec)) => Frame::Run(PageRun::CompressedPages {
            first_page,
            count,
            codec,
            len,
        }),
        (Kind::XbzrlePages, _) => Frame::Run(PageRun::XbzrlePages {
            first_page,
            count,
            len,
        }),
        (Kind::Digests, _) => Frame::Digests { first_page, count },
        (Kind::Discard, _) => Frame::Discard { first_page, count },
        _ => return Err(unexpected(kind, "a run frame")),
    })
}

fn run_frame_header(
    kind: Kind,
    first_page: u64,
    count: u32,
    field: u32,
    body: u64,
) -> [u8; RUN_FRAME_HEADER_LEN] {
    let len = body + RUN_HEADER_LEN as u64;
    let len = u32::try_from(len).expect("run frame length fits in u32");
    let h = RunFrameHeader {
        header: Header {
            kind,
            flags: 0,
            len,
        }
        .layout(),
        run: RunHeader {
            first_page: U64::new(first_page),
            count: U32::new(count),
            field: U32::new(field),
        },
    };
    zerocopy::transmute!(h)
}

/// Header + run header of a ZeroPages marker (the whole frame).
pub fn zero_frame_header(first_page: u64, count: u32) -> [u8; RUN_FRAME_HEADER_LEN] {
    run_frame_header(Kind::ZeroPages, first_page, count, 0, 0)
}

/// Header + run header of a Discard frame (the whole frame).
pub fn discard_frame_header(first_page: u64, count: u32) -> [u8; RUN_FRAME_HEADER_LEN] {
    run_frame_header(Kind::Discard, first_page, count, 0, 0)
}

/// Header + run header of a CompressedPages frame; `len` compressed bytes follow.
pub fn compressed_frame_header(
    first_page: u64,
    count: u32,
    codec: Codec,
    len: u32,
) -> [u8; RUN_FRAME_HEADER_LEN] {
    let (kind, id) = (Kind::CompressedPages, codec.wire_id());
    run_frame_header(kind, first_page, count, id, u64::from(len))
}

/// Header + run header of an XbzrlePages frame; `len` bytes of (u16 length,
/// delta) per page follow.
pub fn xbzrle_frame_header(first_page: u64, count: u32, len: u32) -> [u8; RUN_FRAME_HEADER_LEN] {
    run_frame_header(Kind::XbzrlePages, first_page, count, 0, u64::from(len))
}

/// Header + run header for a Pages frame; `count*page_size` page bytes follow.
/// Panics if the frame length overflows u32 (impossible within the limits).
pub fn pages_frame_header(
    first_page: u64,
    count: u32,
    page_size: u32,
) -> [u8; RUN_FRAME_HEADER_LEN] {
    let body = u64::from(count) * u64::from(page_size);
    run_frame_header(Kind::Pages, first_page, count, 0, body)
}

/// Header + run header for a Digests frame; `count` u64 LE digests follow.
pub fn digests_frame_header(first_page: u64, count: u32) -> [u8; RUN_FRAME_HEADER_LEN] {
    run_frame_header(Kind::Digests, first_page, count, 0, u64::from(count) * 8)
}
