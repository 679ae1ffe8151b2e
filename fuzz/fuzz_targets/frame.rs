//! The frame decoder (`livemig::wire::protocol`) and the data path that
//! reads page runs into memory (`livemig::wire::datapath::Decoder`), fed a
//! stream of frames. The first byte picks the limits the frames are read
//! under. Every control message that decodes must encode back to exactly
//! its bytes (an `Abort` reason is escaped on decode, so it is left out).
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use livemig::guest::memory::GuestMemory;
use livemig::util::page::PageSize;
use livemig::wire::datapath::{Decoder, Landed};
use livemig::wire::protocol::{self, Frame, Hello, Limits, Message, PageRun};

const PAGES: u64 = 256;

/// Destination memory of the host's page size, made once.
fn memory() -> &'static (GuestMemory, Landed) {
    static MEM: OnceLock<(GuestMemory, Landed)> = OnceLock::new();
    MEM.get_or_init(|| {
        let page = PageSize::host();
        let mem = GuestMemory::create(PAGES * page.as_u64(), page).expect("memory");
        (mem, Landed::new(PAGES, page))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut r)) = data.split_first() else {
        return;
    };
    let (mem, landed) = memory();
    let host = mem.page_size().as_u64() as u32;
    let limits = match pick & 3 {
        0 => None,
        1 => Some(Limits {
            streams: 1,
            page_size: host,
            page_count: PAGES,
        }),
        2 => Some(Limits {
            streams: 4,
            page_size: 512,
            page_count: 3,
        }),
        _ => Some(Limits {
            streams: 64,
            page_size: 65536,
            page_count: u64::MAX / 65536,
        }),
    };
    let into_memory = pick & 3 == 1;
    if pick & 4 != 0 {
        // A fresh connection: the first frame must be a Hello.
        match protocol::read_handshake::<Hello>(&mut r) {
            Ok(h) => {
                let _ = h.limits();
            }
            Err(_) => return,
        }
    }
    let mut decoder = Decoder::new(mem.page_size());
    loop {
        let before = r;
        match protocol::read_frame(&mut r, limits.as_ref()) {
            Ok(Frame::Message(m)) => {
                if !matches!(m, Message::Abort(_)) {
                    let used = &before[..before.len() - r.len()];
                    assert_eq!(m.encode(), used, "{m:?} does not encode back");
                }
            }
            Ok(Frame::Run(run)) if into_memory => {
                // SAFETY: nothing else uses this memory; one input at a time.
                if unsafe { decoder.receive(&mut r, &run, mem, landed) }.is_err() {
                    return;
                }
            }
            Ok(Frame::Run(run)) => {
                let ps = u64::from(limits.map_or(0, |l| l.page_size));
                let bulk = match run {
                    PageRun::Pages { count, .. } => u64::from(count) * ps,
                    PageRun::ZeroPages { .. } => 0,
                    PageRun::CompressedPages { len, .. } | PageRun::XbzrlePages { len, .. } => {
                        u64::from(len)
                    }
                };
                let n = std::io::copy(&mut (&mut r).take(bulk), &mut std::io::sink());
                if n.ok() != Some(bulk) {
                    return;
                }
            }
            Ok(Frame::Digests { count, .. }) => {
                if protocol::read_digests(&mut r, count).is_err() {
                    return;
                }
            }
            Ok(Frame::Discard { .. }) => {}
            Err(_) => return,
        }
    }
});
