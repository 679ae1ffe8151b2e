//! Page-cache teleportation (version 4): the destination reads a share of
//! the guest's page cache from shared storage itself, while the other pages
//! stream (see `crate::migration::teleport`).
//!
//! ```text
//! sender                                  receiver
//!   | TeleportOffer{blocks,block_size,   ->|  reads the sampled blocks of its
//!   |   samples,digest}                    |    own file: same digest? how fast?
//!   |<- TeleportAck{accepted,rate,reason}  |  refused: every page by network
//!   | RoundStart{0}                      ->|
//!   | TeleportMap{(page,block,count)*}*  ->|  storage reads start at once
//!   | Pages* ... RoundEnd{0}             ->|  a page that arrives by network
//!   |   ...                                |    is never overwritten by storage
//!   | TeleportSync                       ->|  (before the pause)
//!   |<- TeleportDone{pages,skipped,bytes,  |  storage has finished
//!   |                busy_ns}              |
//! ```

use zerocopy::byteorder::{LE, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::control::{layout, Control, Size};
use super::header::{bad_len, reserved, Kind, Limits, ProtocolError, MAX_ABORT_REASON};

/// Most (page, block, count) entries in one `TeleportMap`.
pub const MAX_MAP_ENTRIES: usize = 16384;
/// Most pages one map entry names.
pub const MAX_MAP_RUN: u32 = 1 << 20;

/// The sender offers to teleport: its backing file must hold `blocks`
/// blocks of `block_size` bytes, and `samples` of them (spread evenly) hash
/// to `digest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeleportOffer {
    pub blocks: u64,
    pub block_size: u32,
    pub samples: u32,
    pub digest: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct OfferLayout {
    blocks: U64<LE>,
    block_size: U32<LE>,
    samples: U32<LE>,
    digest: U64<LE>,
}

impl Control for TeleportOffer {
    const KIND: Kind = Kind::TeleportOffer;
    const SIZE: Size = Size::Fixed(size_of::<OfferLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = OfferLayout {
            blocks: U64::new(self.blocks),
            block_size: U32::new(self.block_size),
            samples: U32::new(self.samples),
            digest: U64::new(self.digest),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, lim: Option<&Limits>) -> Result<Self, ProtocolError> {
        let kind = Self::KIND;
        let l: OfferLayout = layout(kind, &p)?;
        let (blocks, block_size, samples) = (l.blocks.get(), l.block_size.get(), l.samples.get());
        if let Some(lim) = lim {
            if block_size != lim.page_size || blocks > lim.page_count {
                let detail = format!(
                    "{blocks} blocks of {block_size} bytes for {} pages of {}",
                    lim.page_count, lim.page_size
                );
                return Err(ProtocolError::BadField { kind, detail });
            }
        }
        Ok(TeleportOffer {
            blocks,
            block_size,
            samples,
            digest: l.digest.get(),
        })
    }
}

/// The receiver's answer: accepted, with its storage's measured read rate
/// (bytes/s), or refused, saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeleportAck {
    pub accepted: bool,
    pub storage_rate: u64,
    pub reason: String,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct AckLayout {
    accepted: U32<LE>,
    reserved: U32<LE>,
    storage_rate: U64<LE>,
}

const ACK_LEN: usize = size_of::<AckLayout>();

impl Control for TeleportAck {
    const KIND: Kind = Kind::TeleportAck;
    const SIZE: Size = Size::Between {
        min: ACK_LEN,
        max: ACK_LEN + MAX_ABORT_REASON,
    };
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = AckLayout {
            accepted: U32::new(u32::from(self.accepted)),
            reserved: U32::new(0),
            storage_rate: U64::new(self.storage_rate),
        };
        out.extend_from_slice(l.as_bytes());
        let mut end = self.reason.len().min(MAX_ABORT_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&self.reason.as_bytes()[..end]);
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let kind = Self::KIND;
        let l: AckLayout = layout(kind, &p[..ACK_LEN.min(p.len())])?;
        reserved(kind, u64::from(l.reserved.get()))?;
        let accepted = match l.accepted.get() {
            0 => false,
            1 => true,
            v => {
                let detail = format!("accepted is {v}, not 0 or 1");
                return Err(ProtocolError::BadField { kind, detail });
            }
        };
        let reason = String::from_utf8_lossy(&p[ACK_LEN..]);
        Ok(TeleportAck {
            accepted,
            storage_rate: l.storage_rate.get(),
            reason: crate::util::text::printable(&reason, MAX_ABORT_REASON),
        })
    }
}

/// Pages `first_page..+count` hold blocks `first_block..+count`: the
/// receiver reads them from its storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub first_page: u64,
    pub first_block: u64,
    pub count: u32,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct EntryLayout {
    first_page: U64<LE>,
    first_block: U64<LE>,
    count: U32<LE>,
    reserved: U32<LE>,
}

const ENTRY_LEN: usize = size_of::<EntryLayout>();

/// A batch of the teleport mapping, in the order the receiver should read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeleportMap(pub Vec<MapEntry>);

impl Control for TeleportMap {
    const KIND: Kind = Kind::TeleportMap;
    const SIZE: Size = Size::Between {
        min: ENTRY_LEN,
        max: ENTRY_LEN * MAX_MAP_ENTRIES,
    };
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        for e in self.0.iter().take(MAX_MAP_ENTRIES) {
            let l = EntryLayout {
                first_page: U64::new(e.first_page),
                first_block: U64::new(e.first_block),
                count: U32::new(e.count),
                reserved: U32::new(0),
            };
            out.extend_from_slice(l.as_bytes());
        }
        0
    }
    fn decode(_: u16, p: Vec<u8>, lim: Option<&Limits>) -> Result<Self, ProtocolError> {
        let kind = Self::KIND;
        if !p.len().is_multiple_of(ENTRY_LEN) {
            let expected = format!("a multiple of {ENTRY_LEN}");
            return Err(bad_len(kind, p.len() as u64, expected));
        }
        let mut entries = Vec::with_capacity(p.len() / ENTRY_LEN);
        for chunk in p.chunks_exact(ENTRY_LEN) {
            let l: EntryLayout = layout(kind, chunk)?;
            reserved(kind, u64::from(l.reserved.get()))?;
            let (first_page, first_block, count) =
                (l.first_page.get(), l.first_block.get(), l.count.get());
            if count == 0 || count > MAX_MAP_RUN {
                let max = MAX_MAP_RUN;
                return Err(ProtocolError::BadCount { kind, count, max });
            }
            if first_block.checked_add(u64::from(count)).is_none() {
                let detail = format!("block run {first_block}+{count} overflows");
                return Err(ProtocolError::BadField { kind, detail });
            }
            if let Some(l) = lim {
                l.check_run(kind, first_page, count)?;
            }
            entries.push(MapEntry {
                first_page,
                first_block,
                count,
            });
        }
        Ok(TeleportMap(entries))
    }
}

/// The sender is about to pause the guest: answer once storage is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeleportSync;

impl Control for TeleportSync {
    const KIND: Kind = Kind::TeleportSync;
    const SIZE: Size = Size::Fixed(0);
    fn encode(&self, _: &mut Vec<u8>) -> u16 {
        0
    }
    fn decode(_: u16, _: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        Ok(TeleportSync)
    }
}

/// Storage has finished: pages it placed, pages it skipped because a
/// newer copy had come by network, bytes it read, time it was busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeleportDone {
    pub pages: u64,
    pub skipped: u64,
    pub bytes: u64,
    pub busy_ns: u64,
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct DoneLayout {
    pages: U64<LE>,
    skipped: U64<LE>,
    bytes: U64<LE>,
    busy_ns: U64<LE>,
}

impl Control for TeleportDone {
    const KIND: Kind = Kind::TeleportDone;
    const SIZE: Size = Size::Fixed(size_of::<DoneLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = DoneLayout {
            pages: U64::new(self.pages),
            skipped: U64::new(self.skipped),
            bytes: U64::new(self.bytes),
            busy_ns: U64::new(self.busy_ns),
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, lim: Option<&Limits>) -> Result<Self, ProtocolError> {
        let kind = Self::KIND;
        let l: DoneLayout = layout(kind, &p)?;
        let (pages, skipped) = (l.pages.get(), l.skipped.get());
        if let Some(lim) = lim {
            if pages.saturating_add(skipped) > lim.page_count {
                let detail = format!(
                    "{pages} + {skipped} pages exceed memory of {}",
                    lim.page_count
                );
                return Err(ProtocolError::BadField { kind, detail });
            }
        }
        Ok(TeleportDone {
            pages,
            skipped,
            bytes: l.bytes.get(),
            busy_ns: l.busy_ns.get(),
        })
    }
}
