//! The handshakes: the first message on each connection opens with the
//! magic and the version, which keep their place in every version.

use zerocopy::byteorder::{LE, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::control::{layout, Control, Greeting, Size};
use super::header::{
    reserved, Kind, Limits, ProtocolError, HELLO_POSTCOPY, MAX_PAGE_SIZE, MAX_STREAMS,
    MIN_PAGE_SIZE, VERSION,
};
use crate::util::page::PageSize;

/// The first message on a connection: it opens with magic and version.
pub trait Handshake: Control {}

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

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloLayout {
    greeting: Greeting,
    page_size: U32<LE>,
    memory_bytes: U64<LE>,
    streams: U32<LE>,
    /// [`HELLO_POSTCOPY`]; other bits reserved.
    flags: U32<LE>,
    session: U64<LE>,
}

impl Control for Hello {
    const KIND: Kind = Kind::Hello;
    const SIZE: Size = Size::Greeting(size_of::<HelloLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let flags = if self.postcopy { HELLO_POSTCOPY } else { 0 };
        let l = HelloLayout {
            greeting: Greeting::new(self.version),
            page_size: U32::new(self.page_size),
            memory_bytes: U64::new(self.memory_bytes),
            streams: U32::new(self.streams),
            flags: U32::new(flags),
            session: U64::new(self.session),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: HelloLayout = layout(Self::KIND, &p)?;
        let flags = l.flags.get();
        reserved(Self::KIND, u64::from(flags & !HELLO_POSTCOPY))?;
        Ok(Hello {
            version: l.greeting.version.get(),
            page_size: l.page_size.get(),
            memory_bytes: l.memory_bytes.get(),
            streams: l.streams.get(),
            session: l.session.get(),
            postcopy: flags & HELLO_POSTCOPY != 0,
        })
    }
}
impl Handshake for Hello {}

impl Hello {
    /// Validate against what this side accepts and derive the [`Limits`].
    pub fn limits(&self) -> Result<Limits, ProtocolError> {
        if self.version != VERSION {
            return Err(ProtocolError::Version { peer: self.version });
        }
        let ps = self.page_size;
        if PageSize::try_from(ps).is_err() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
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

/// The receiver accepts the `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u32,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloAckLayout {
    greeting: Greeting,
    reserved: U32<LE>,
}

impl Control for HelloAck {
    const KIND: Kind = Kind::HelloAck;
    const SIZE: Size = Size::Greeting(size_of::<HelloAckLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let greeting = Greeting::new(self.version);
        let l = HelloAckLayout {
            greeting,
            reserved: U32::ZERO,
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: HelloAckLayout = layout(Self::KIND, &p)?;
        reserved(Self::KIND, u64::from(l.reserved.get()))?;
        let version = l.greeting.version.get();
        Ok(HelloAck { version })
    }
}
impl Handshake for HelloAck {}

/// Opens a data connection (or, with [`super::REQUEST_STREAM`], the
/// post-copy request connection) of migration `session`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHello {
    pub index: u32,
    pub session: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct StreamHelloLayout {
    greeting: Greeting,
    index: U32<LE>,
    session: U64<LE>,
}

impl Control for StreamHello {
    const KIND: Kind = Kind::StreamHello;
    const SIZE: Size = Size::Greeting(size_of::<StreamHelloLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = StreamHelloLayout {
            greeting: Greeting::new(VERSION),
            index: U32::new(self.index),
            session: U64::new(self.session),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: StreamHelloLayout = layout(Self::KIND, &p)?;
        let (index, session) = (l.index.get(), l.session.get());
        Ok(StreamHello { index, session })
    }
}
impl Handshake for StreamHello {}
