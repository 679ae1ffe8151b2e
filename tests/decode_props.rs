//! Property tests of decoding untrusted bytes, run in CI beside the fuzz
//! targets (`fuzz/`, which explore much further): random and mutated
//! frames, and real recorded sessions (the fuzz seeds) mutated, replayed
//! through the destination. Whatever the bytes: no panic, an end, never
//! more memory held at once than the negotiated limits allow, and a
//! failure is one clean line.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use livemig::guest::memory::GuestMemory;
use livemig::migration::destination::{replay, ReplayConn};
use livemig::util::page::PageSize;
use livemig::wire::datapath::{Decoder, Landed};
use livemig::wire::protocol::{
    self, Frame, Limits, MAX_CONTROL_PAYLOAD, MAX_DIGESTS, MAX_RUN_PAGES,
};
use proptest::prelude::*;

/// Counts the bytes each thread holds, and the most it held at once.
struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn note(delta: i64) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counting
// only touches const-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) };
        note(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most bytes `f` held at once on this thread, beyond what it started with.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let t = f();
    (t, (PEAK.with(Cell::get) - start).max(0) as u64)
}

/// What reading one frame may hold: the largest payload any frame may
/// announce under `limits`, and room for an error message.
fn frame_bound(limits: Option<&Limits>) -> u64 {
    let run = limits.map_or(0, |l| {
        u64::from(MAX_RUN_PAGES) * (u64::from(l.page_size) + 1)
    });
    let digests = u64::from(MAX_DIGESTS) * 8;
    (MAX_CONTROL_PAYLOAD as u64).max(run).max(digests) + (64 << 10)
}

/// An error as the user sees it: one line, printable, not empty.
fn assert_clean(line: &str) {
    assert!(!line.is_empty(), "an empty error");
    assert!(!line.contains('\n'), "more than one line: {line:?}");
    assert!(
        !line.chars().any(char::is_control),
        "control characters: {line:?}"
    );
}

const PAGES: u64 = 256;

fn limits_for(pick: u8) -> Option<Limits> {
    let host = PageSize::host().as_u64() as u32;
    match pick % 3 {
        0 => None,
        1 => Some(Limits {
            streams: 1,
            page_size: host,
            page_count: PAGES,
        }),
        _ => Some(Limits {
            streams: 64,
            page_size: 65536,
            page_count: u64::MAX / 65536,
        }),
    }
}

/// Read frames from `bytes` until the first error or the end, decoding
/// page runs into `mem` (when its page size is the limits'). Returns how
/// it ended.
fn decode_all(bytes: &[u8], limits: Option<&Limits>, mem: &GuestMemory) -> Option<String> {
    let landed = Landed::new(mem.page_count(), mem.page_size());
    let mut decoder = Decoder::new(mem.page_size());
    let fits = limits.is_some_and(|l| u64::from(l.page_size) == mem.page_size().as_u64());
    let mut r = bytes;
    loop {
        let frame = match protocol::read_frame(&mut r, limits) {
            Ok(f) => f,
            Err(protocol::ProtocolError::Closed) if r.is_empty() => return None,
            Err(e) => return Some(livemig::util::error::error_chain(&e)),
        };
        let bulk = match frame {
            Frame::Run(run) if fits => {
                // SAFETY: this test alone uses `mem`.
                match unsafe { decoder.receive(&mut r, &run, mem, &landed) } {
                    Ok(_) => continue,
                    Err(e) => return Some(livemig::util::error::error_chain(&e)),
                }
            }
            Frame::Run(protocol::PageRun::Pages { count, .. }) => {
                u64::from(count) * u64::from(limits.map_or(0, |l| l.page_size))
            }
            Frame::Run(
                protocol::PageRun::CompressedPages { len, .. }
                | protocol::PageRun::XbzrlePages { len, .. },
            ) => u64::from(len),
            Frame::Digests { count, .. } => u64::from(count) * 8,
            _ => 0,
        };
        let n = r.len().min(usize::try_from(bulk).unwrap_or(usize::MAX));
        if (n as u64) < bulk {
            return Some("truncated bulk".into());
        }
        r = &r[n..];
    }
}

fn memory() -> GuestMemory {
    GuestMemory::create(PAGES * PageSize::host().as_u64(), PageSize::host()).unwrap()
}

/// The fuzz targets' seeds: real sessions, recorded from `send` (see
/// `record_fuzz_seeds` in tests/misbehave.rs).
fn seeds() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("raw", include_bytes!("../fuzz/seeds/session/raw.bin")),
        (
            "lz4-xbzrle",
            include_bytes!("../fuzz/seeds/session/lz4-xbzrle.bin"),
        ),
        ("zstd", include_bytes!("../fuzz/seeds/session/zstd.bin")),
        (
            "postcopy",
            include_bytes!("../fuzz/seeds/session/postcopy.bin"),
        ),
    ]
}

const SESSION_MEMORY: u64 = 1 << 20;

/// What replaying a session may hold at once: the digests of its pages as
/// they landed, the pages to fetch, one frame, and the report.
fn session_bound() -> u64 {
    let pages = SESSION_MEMORY / PageSize::host().as_u64();
    pages * 8 + pages / 8 + frame_bound(None).max(frame_bound(limits_for(1).as_ref())) + (64 << 10)
}

/// Replay `bytes`; on failure, check the error is clean and reported.
fn replay_checked(bytes: &[u8]) -> Result<(), String> {
    let ((report, result), peak) = peak_of(|| replay(&mut ReplayConn::new(bytes), SESSION_MEMORY));
    assert!(peak <= session_bound(), "held {peak} bytes at once");
    match result {
        Ok(()) => {
            assert_eq!(report.status, livemig::report::Status::Completed);
            Ok(())
        }
        Err(e) => {
            let line = livemig::util::error::error_chain(&e);
            assert_clean(&line);
            assert_eq!(report.status, livemig::report::Status::Failed);
            assert_eq!(report.error.as_deref(), Some(line.as_str()));
            Err(line)
        }
    }
}

#[test]
fn the_recorded_seeds_replay_to_the_end() {
    for (name, bytes) in seeds() {
        let r = replay_checked(bytes);
        assert!(
            r.is_ok(),
            "seed {name}: {r:?} (if the protocol changed, record the seeds again: \
             cargo test --release --test misbehave -- --ignored record_fuzz_seeds)"
        );
    }
}

/// Byte-level damage: flip, overwrite, insert or remove at `at`.
#[derive(Clone, Debug)]
enum Damage {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(a, x)| Damage::Flip(a, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Damage::Set(a, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(a, v)| Damage::Insert(a, v)),
        (any::<usize>(), 1..64usize).prop_map(|(a, n)| Damage::Remove(a, n)),
        any::<usize>().prop_map(Damage::Truncate),
    ]
}

fn apply(bytes: &[u8], damages: &[Damage]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for d in damages {
        let at = |a: usize| a % (b.len() + 1);
        match d {
            Damage::Flip(a, x) if !b.is_empty() => {
                let i = a % b.len();
                b[i] ^= x;
            }
            Damage::Set(a, v) if !b.is_empty() => {
                let i = a % b.len();
                b[i] = *v;
            }
            Damage::Insert(a, v) => {
                let i = at(*a);
                b.splice(i..i, v.iter().copied());
            }
            Damage::Remove(a, n) => {
                let i = at(*a);
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Damage::Truncate(a) => {
                let i = at(*a);
                b.truncate(i);
            }
            _ => {}
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_stay_within_limits(
        pick in any::<u8>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let limits = limits_for(pick);
        let mem = memory();
        let (end, peak) = peak_of(|| decode_all(&bytes, limits.as_ref(), &mem));
        prop_assert!(peak <= frame_bound(limits.as_ref()), "held {} bytes", peak);
        if let Some(line) = end {
            assert_clean(&line);
        }
    }

    #[test]
    fn damaged_recorded_frames_never_panic_and_stay_within_limits(
        seed in 0..3usize,
        damages in proptest::collection::vec(damage(), 1..6),
    ) {
        let (_, session) = seeds()[seed];
        // Skip the Hello: the frames after it, under its limits.
        let frames = common::frames(session);
        let body: Vec<u8> = frames[1..].concat();
        let bytes = apply(&body, &damages);
        let limits = limits_for(1);
        let mem = memory();
        let (end, peak) = peak_of(|| decode_all(&bytes, limits.as_ref(), &mem));
        prop_assert!(peak <= frame_bound(limits.as_ref()), "held {} bytes", peak);
        if let Some(line) = end {
            assert_clean(&line);
        }
    }

    #[test]
    fn damaged_sessions_end_cleanly(
        seed in 0..4usize,
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        let (_, session) = seeds()[seed];
        let bytes = apply(session, &damages);
        let r = replay_checked(&bytes);
        // A session cut short can never complete.
        if bytes.len() < session.len() && session.starts_with(&bytes) {
            prop_assert!(r.is_err());
        }
    }

    #[test]
    fn sessions_spoiled_at_frame_boundaries_always_fail(
        seed in 0..3usize,
        draw in any::<u64>(),
    ) {
        let (_, session) = seeds()[seed];
        let frames = common::frames(session);
        let m = common::Mutation::draw(&mut fastrand::Rng::with_seed(draw), &frames);
        let r = replay_checked(&m.apply(&frames).concat());
        prop_assert!(r.is_err(), "{:?} completed", m);
    }
}

#[test]
fn the_counter_sees_what_is_held_at_once() {
    let (_, peak) = peak_of(|| {
        let a = vec![1u8; 1 << 20];
        drop(a);
        vec![2u8; 1 << 10].len()
    });
    assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&peak), "{peak}");
}
