//! How fast the predictions run: the simulator on a 1 TiB guest, and 1000
//! sequential migrations of the default 256 MiB guest through the simulator
//! and through the model (issue 6: "a 1 TiB guest or 1000 sequential
//! migrations in seconds").
//!
//! `cargo bench --bench predict`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use livemig::migration::source::SenderConfig;
use livemig::predict::model::{self, Variant};
use livemig::predict::simulate::{self, SimConfig};

fn config(memory_bytes: u64, workload: &str, seed: u64) -> SimConfig {
    SimConfig {
        migration: SenderConfig {
            memory_bytes,
            workload: workload.parse().expect("a valid spec"),
            max_time: Duration::from_secs(3600),
            seed,
            ..SenderConfig::default()
        },
        page_size: livemig::util::page::PageSize::MIN,
        link_bytes_per_s: 10e9 / 8.0,
        round_overhead: Duration::from_micros(100),
        downtime_overhead: Duration::from_micros(500),
        harvest_per_gib: Duration::ZERO,
        setup: Duration::from_millis(1),
    }
}

/// The claim: each of these predictions takes seconds, not minutes. Checked
/// on one run before it is benched (`scripts/bench-criterion.sh`).
const CLAIM: Duration = Duration::from_secs(10);

fn within_claim(what: &str, f: impl FnOnce()) {
    let t = std::time::Instant::now();
    f();
    let took = t.elapsed();
    assert!(
        took < CLAIM,
        "{what} took {took:?}, the claim is under {CLAIM:?}"
    );
    eprintln!("{what}: {took:.2?} (claim: under {CLAIM:?})");
}

fn predict(c: &mut Criterion) {
    let mut g = c.benchmark_group("predict");
    g.sample_size(10);
    let tib = config(1 << 40, "hotset:wws=1G,rate=100k", 1);
    let vms: Vec<SimConfig> = (0..1000)
        .map(|i| config(256 << 20, "hotset:wws=32M,rate=50k", i))
        .collect();
    within_claim("simulate 1 TiB", || {
        black_box(simulate::run(&tib).expect("simulates"));
    });
    within_claim("simulate 1000 x 256 MiB", || {
        vms.iter()
            .for_each(|c| drop(black_box(simulate::run(c).expect("simulates"))));
    });
    within_claim("model 1000 x 256 MiB", || {
        vms.iter()
            .for_each(|c| drop(black_box(model::run(c, Variant::Wws).expect("models"))));
    });
    g.bench_function("simulate 1 TiB", |b| {
        b.iter(|| simulate::run(&tib).expect("simulates"))
    });
    g.bench_function("simulate 1000 x 256 MiB", |b| {
        b.iter(|| {
            for c in &vms {
                black_box(simulate::run(c).expect("simulates"));
            }
        })
    });
    g.bench_function("model 1000 x 256 MiB", |b| {
        b.iter(|| {
            for c in &vms {
                black_box(model::run(c, Variant::Wws).expect("models"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, predict);
criterion_main!(benches);
