//! Hot paths: frame encode/decode and dirty-bitmap harvest over 1 GiB of guest memory.
//!
//! `cargo bench --bench core` (add `-- harvest` etc. to filter).

use std::cell::RefCell;
use std::hint::black_box;
use std::io::Cursor;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use livemig::dirty::{DirtySet, SharedBitmap};
use livemig::protocol::{pages_frame_header, read_frame, Frame, Limits, Message};

const PAGE_SIZE: u32 = 4096;
/// 1 GiB of 4 KiB pages: 262144.
const PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;
const LIMITS: Limits = Limits {
    page_size: PAGE_SIZE,
    page_count: PAGES,
};
/// Pages per run / Pages frame.
const RUN: u32 = 256;

/// `percent`% of the pages, scattered: `i * odd mod 2^18` is a permutation, so distinct.
fn marked(percent: u64) -> impl Iterator<Item = u64> {
    (0..PAGES * percent / 100).map(|i| i.wrapping_mul(0x9E37_79B9) % PAGES)
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let msgs = [
        ("RoundEnd", Message::round_end(7, 12_345)),
        ("DeviceState 4 KiB", Message::device_state(vec![0xA5; 4096])),
    ];
    for (name, m) in &msgs {
        g.bench_function(format!("encode {name}"), |b| {
            b.iter(|| black_box(m).encode())
        });
        let bytes = m.encode();
        let decode = || read_frame(&mut Cursor::new(black_box(&bytes[..])), Some(&LIMITS));
        assert_eq!(decode().unwrap(), Frame::Message(m.clone()));
        g.bench_function(format!("decode {name}"), |b| b.iter(|| decode().unwrap()));
    }
    g.bench_function("encode Pages header", |b| {
        b.iter(|| pages_frame_header(black_box(1000), black_box(RUN), black_box(PAGE_SIZE)))
    });
    let hdr = pages_frame_header(PAGES - u64::from(RUN), RUN, PAGE_SIZE);
    let decode = || read_frame(&mut Cursor::new(black_box(&hdr[..])), Some(&LIMITS));
    assert!(matches!(decode(), Ok(Frame::Pages { count: RUN, .. })));
    g.bench_function("decode Pages header", |b| b.iter(|| decode().unwrap()));
    g.finish();
}

type Pool = Rc<RefCell<Vec<SharedBitmap>>>;

/// A bitmap taken from a pool and given back when criterion drops the input,
/// after the timed loop: each input of a batch has its own already-faulted-in
/// bitmap, and no memfd is created or unmapped while timed.
struct Lease(Option<SharedBitmap>, Pool);

impl Lease {
    fn take(pool: &Pool, percent: u64) -> Lease {
        let popped = pool.borrow_mut().pop();
        let bm = popped.unwrap_or_else(|| SharedBitmap::create(PAGES).expect("bitmap memfd"));
        marked(percent).for_each(|p| bm.mark(p));
        Lease(Some(bm), pool.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.1.borrow_mut().extend(self.0.take());
    }
}

fn harvest(c: &mut Criterion) {
    let mut g = c.benchmark_group("harvest 1 GiB");
    let pool = Pool::default();
    for percent in [0, 1, 100] {
        let lease = Lease::take(&pool, percent);
        let mut set = DirtySet::new(PAGES);
        lease.0.as_ref().unwrap().take_into(&mut set);
        assert_eq!(set.count(), PAGES * percent / 100);
        drop(lease);
        g.bench_function(format!("{percent}%"), |b| {
            b.iter_batched_ref(
                || (Lease::take(&pool, percent), DirtySet::new(PAGES)),
                |(lease, set)| lease.0.as_ref().unwrap().take_into(set),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn runs(c: &mut Criterion) {
    let mut g = c.benchmark_group("runs(256) 1 GiB");
    for (name, percent, expect) in [("1% scattered", 1, None), ("100%", 100, Some(1024))] {
        let mut set = DirtySet::new(PAGES);
        marked(percent).for_each(|p| set.set(p));
        let count = || black_box(&set).runs(u64::from(RUN)).count();
        assert!(expect.is_none_or(|n| count() == n));
        g.bench_function(name, |b| b.iter(count));
    }
    g.finish();
}

criterion_group!(benches, frames, harvest, runs);
criterion_main!(benches);
