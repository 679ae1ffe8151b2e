//! Hot paths: frame encode/decode, and turning a 1 GiB dirty set into runs.
//! (Harvest costs of every tracker are in `benches/trackers.rs`.)
//!
//! `cargo bench --bench core` (add `-- runs` etc. to filter).

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::guest::dirty::DirtySet;
use livemig::wire::protocol::{pages_frame_header, read_frame, Frame, Limits, Message, PageRun};

const PAGE_SIZE: u32 = 4096;
/// 1 GiB of 4 KiB pages: 262144.
const PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;
const LIMITS: Limits = Limits {
    streams: 1,
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
    assert!(matches!(
        decode(),
        Ok(Frame::Run(PageRun::Pages { count: RUN, .. }))
    ));
    g.bench_function("decode Pages header", |b| b.iter(|| decode().unwrap()));
    g.finish();
}

/// Runs of at most `RUN` pages that cover `pages`, counted the slow way:
/// sort, split at every gap, cut each stretch into chunks.
fn runs_by_hand(pages: impl Iterator<Item = u64>) -> usize {
    let mut sorted: Vec<u64> = pages.collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs = 0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
            j += 1;
        }
        runs += (j - i).div_ceil(RUN as usize);
        i = j;
    }
    runs
}

fn runs(c: &mut Criterion) {
    let mut g = c.benchmark_group("runs(256) 1 GiB");
    for (name, percent) in [("1% scattered", 1), ("100%", 100)] {
        let mut set = DirtySet::new(PAGES);
        marked(percent).for_each(|p| set.set(p));
        let count = || black_box(&set).runs(u64::from(RUN)).count();
        assert_eq!(count(), runs_by_hand(marked(percent)), "{name}");
        g.bench_function(name, |b| b.iter(count));
    }
    assert_eq!(runs_by_hand(marked(100)), 1024);
    g.finish();
}

criterion_group!(benches, frames, runs);
criterion_main!(benches);
