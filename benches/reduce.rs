//! Data reduction: the zero-page check, XBZRLE deltas of one page, and LZ4 /
//! zstd on a 1 MiB run (256 pages of 4 KiB, compressed as one block as the
//! data path does).
//!
//! `cargo bench --bench reduce` (add `-- xbzrle` etc. to filter).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::wire::reduce::{is_zero, Codec, Compressor, Decompressor};
use livemig::wire::xbzrle;
use xxhash_rust::xxh3::xxh3_64;

const PAGE: usize = 4096;
/// Pages per run: 1 MiB.
const RUN: usize = 256;

/// `len` pseudo-random bytes: xxh3 of a counter.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| xxh3_64(&(seed << 32 | i).to_le_bytes()).to_le_bytes())
        .take(len)
        .collect()
}

fn zero_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero 4 KiB");
    g.throughput(Throughput::Bytes(PAGE as u64));
    let page_with = |at: Option<usize>| {
        let mut p = vec![0u8; PAGE];
        if let Some(i) = at {
            p[i] = 1;
        }
        p
    };
    for (name, page, expect) in [
        ("zero page", page_with(None), true),
        ("first byte set", page_with(Some(0)), false),
        ("last byte set", page_with(Some(PAGE - 1)), false),
    ] {
        assert_eq!(is_zero(&page), expect, "{name}");
        g.bench_function(name, |b| b.iter(|| is_zero(black_box(&page))));
    }
    g.finish();
}

fn xbzrle_delta(c: &mut Criterion) {
    let mut g = c.benchmark_group("xbzrle 4 KiB");
    g.throughput(Throughput::Bytes(PAGE as u64));
    let old = random_bytes(1, PAGE);
    // Flips `len` bytes at each `(start, len)`.
    let changed = |runs: &[(usize, usize)]| {
        let mut new = old.clone();
        for &(start, len) in runs {
            new[start..start + len].iter_mut().for_each(|b| *b = !*b);
        }
        new
    };
    let scattered: Vec<_> = (0..64).map(|i| (i * 64 + 20, 8)).collect();
    for (name, new, fits) in [
        ("8 bytes changed", changed(&[(1000, 8)]), true),
        ("512 bytes scattered", changed(&scattered), true),
        ("all bytes changed", changed(&[(0, PAGE)]), false),
    ] {
        let mut delta = Vec::with_capacity(2 * PAGE);
        let mut encode = |limit| {
            delta.clear();
            xbzrle::encode(black_box(&old), black_box(&new), &mut delta, limit)
        };
        assert_eq!(encode(PAGE).is_some(), fits, "{name}");
        g.bench_function(format!("encode {name}"), |b| b.iter(|| encode(PAGE)));

        // An overflowing page is never decoded; time its unlimited delta instead.
        encode(usize::MAX).unwrap();
        let mut page = old.clone();
        xbzrle::decode(&delta, &mut page).unwrap();
        assert!(page == new, "{name}: round trip");
        // Decoding over the new version rewrites the same bytes: no reset needed.
        let label = if fits {
            name.to_owned()
        } else {
            format!("{name} (unlimited)")
        };
        g.bench_function(format!("decode {label}"), |b| {
            b.iter(|| xbzrle::decode(black_box(&delta), black_box(&mut page)).unwrap())
        });
    }
    g.finish();
}

/// 256 zero pages, each stamped with one u64 at offset 8.
fn stamped() -> Vec<u8> {
    let mut v = vec![0u8; RUN * PAGE];
    for (i, p) in v.chunks_exact_mut(PAGE).enumerate() {
        p[8..16].copy_from_slice(&(i as u64 * 0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    v
}

/// 256 pages whose first 2 KiB are random and the rest zero.
fn half_random() -> Vec<u8> {
    let mut v = vec![0u8; RUN * PAGE];
    for (i, p) in v.chunks_exact_mut(PAGE).enumerate() {
        p[..PAGE / 2].copy_from_slice(&random_bytes(i as u64, PAGE / 2));
    }
    v
}

fn codecs(c: &mut Criterion) {
    for codec in [Codec::Lz4, Codec::Zstd] {
        let mut g = c.benchmark_group(format!("{codec} 1 MiB"));
        g.throughput(Throughput::Bytes((RUN * PAGE) as u64));
        for (name, data) in [("stamped", stamped()), ("half-random", half_random())] {
            let mut cx = Compressor::new(codec).unwrap();
            let mut dx = Decompressor::new(codec).unwrap();
            let mut packed = Vec::new();
            let mut out = vec![0u8; data.len()];
            cx.compress(&data, &mut packed).unwrap();
            dx.decompress_into(&packed, &mut out).unwrap();
            assert!(out == data, "{codec} {name}: round trip");
            assert!(packed.len() < data.len(), "{codec} {name}: no gain");
            g.bench_function(format!("compress {name}"), |b| {
                b.iter(|| cx.compress(black_box(&data), &mut packed).unwrap())
            });
            g.bench_function(format!("decompress {name}"), |b| {
                b.iter(|| dx.decompress_into(black_box(&packed), &mut out).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, zero_check, xbzrle_delta, codecs);
criterion_main!(benches);
