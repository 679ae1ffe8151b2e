use super::*;

const MIB: u64 = 1 << 20;

fn parse(s: &str) -> Result<Layout, WorkloadError> {
    s.parse::<Workload>()?.layout(64 * MIB, PageSize::MIN)
}

#[test]
fn parses_each_kind() {
    assert_eq!(parse("idle").unwrap().pattern, Pattern::Idle);
    let u = parse("uniform:rate=20k").unwrap();
    assert_eq!(
        (u.pattern, u.rate),
        (Pattern::Uniform, PageRate::PerSec(20_000.0))
    );
    let h = parse("hotset:wws=32M,rate=1.5M").unwrap();
    assert_eq!(
        h.pattern,
        Pattern::HotSet {
            wws_pages: 8192,
            hot: 0.95
        }
    );
    assert_eq!(h.rate, PageRate::PerSec(1_500_000.0));
    let s = parse("sweep").unwrap();
    // Default 1 MiB..100 MiB, clipped to 64 MiB of memory.
    assert_eq!(
        s.pattern,
        Pattern::Sweep {
            from_page: 256,
            to_page: 16384
        }
    );
    assert_eq!(s.rate, PageRate::Max);
    assert_eq!(
        parse("hotset:wws=1M,rate=max,hot=0.5").unwrap().rate,
        PageRate::Max
    );
}

#[test]
fn rejects_bad_specs_naming_the_problem() {
    for (spec, needle) in [
        ("busy", "unknown kind \"busy\""),
        ("uniform", "needs rate"),
        ("uniform:rate=fast", "fast"),
        ("hotset:rate=1k", "needs wws"),
        ("hotset:wws=1G,rate=1k", "wws must be"),
        ("hotset:wws=1M,rate=1k,hot=2", "hot=\"2\""),
        ("idle:rate=1k", "idle takes no \"rate\""),
        ("sweep:from=100M", "range is empty"),
        ("uniform:rate", "not key=value"),
        ("idle:zero=1.5", "zero=\"1.5\""),
        ("idle:random=x", "random=\"x\""),
        (
            "uniform:rate=1k,bytes=12",
            "bytes=12 must be a multiple of 8",
        ),
        ("uniform:rate=1k,bytes=8K", "bytes=8192"),
        (
            "sweep:hot=1",
            "it takes: from, to, rate, zero, random, bytes, cache, layout",
        ),
    ] {
        let e = parse(spec).unwrap_err();
        let e = crate::util::error::error_chain(&e);
        assert!(e.contains(needle), "{spec}: {e}");
    }
}

#[test]
fn a_spec_prints_as_given_and_reads_back() {
    for spec in [
        "idle",
        "uniform:rate=20k",
        "hotset:wws=32M,rate=50k,hot=0.9",
        "sweep:from=0,to=16K,zero=0.5,bytes=64",
    ] {
        let w: Workload = spec.parse().unwrap();
        assert_eq!(w.to_string(), spec);
        assert_eq!(w.to_string().parse::<Workload>(), Ok(w.clone()));
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, format!("\"{spec}\""));
        assert_eq!(serde_json::from_str::<Workload>(&json).unwrap(), w);
    }
    // Memory-free errors come at parse time, the rest when laid out.
    assert!("busy".parse::<Workload>().is_err());
    let big: Workload = "hotset:wws=1G,rate=1k".parse().unwrap();
    assert_eq!(
        big.layout(64 * MIB, PageSize::MIN),
        Err(WorkloadError::Wws {
            memory_bytes: 64 * MIB
        })
    );
}

#[test]
fn hotset_keeps_writes_in_the_set() {
    let w = parse("hotset:wws=1M,rate=max,hot=1").unwrap();
    let mut s = Stream::new(&w, 0, 1, 7, 0, None);
    for _ in 0..10_000 {
        let Write::Store {
            page, offset, len, ..
        } = s.next(&w)
        else {
            panic!()
        };
        assert!(page < 256 && offset % 8 == 0 && offset < 4096 && len == 8);
    }
    // Wider writes stay inside their page.
    let w = parse("uniform:rate=max,bytes=4K").unwrap();
    let mut s = Stream::new(&w, 0, 1, 7, 0, None);
    let Write::Store { offset, len, .. } = s.next(&w) else {
        panic!()
    };
    assert_eq!((offset, len), (0, 4096));
}

#[test]
fn content_keys_shape_the_pages() {
    let w = parse("idle:zero=0.25,random=0.5,bytes=64").unwrap();
    assert_eq!(w.content.write_bytes, 64);
    assert_eq!(w.content.random_words(PageSize::MIN), 256);
    let zero = (0..10_000).filter(|&p| w.content.starts_zero(3, p)).count();
    assert!((2300..2700).contains(&zero), "{zero} of 10000 pages zero");
    assert!(!(0..1000).any(|p| parse("idle").unwrap().content.starts_zero(3, p)));
}

#[test]
fn skipping_writes_leaves_the_state_they_would() {
    for spec in ["uniform:rate=1k", "sweep:from=4K,to=40K"] {
        let w = spec
            .parse::<Workload>()
            .unwrap()
            .layout(1 << 20, PageSize::MIN)
            .unwrap();
        let (mut a, mut b) = (
            Stream::new(&w, 1, 2, 9, 0, None),
            Stream::new(&w, 1, 2, 9, 0, None),
        );
        (0..1000).for_each(|_| {
            a.next(&w);
        });
        b.skip(&w, 1000);
        assert_eq!((a.ops, a.cursor), (b.ops, b.cursor), "{spec}");
        assert_eq!(a.next(&w), b.next(&w), "{spec}");
    }
}

#[test]
fn a_resumed_stream_continues_the_same_sequence() {
    let w = parse("uniform:rate=1k").unwrap();
    let mut a = Stream::new(&w, 0, 1, 42, 0, None);
    let first: Vec<_> = (0..100).map(|_| a.next(&w)).collect();
    let mut b = Stream::new(&w, 0, 1, 42, 50, None);
    assert_eq!(b.next(&w), first[50]);
    let sw = parse("sweep:from=0,to=16K").unwrap();
    let mut c = Stream::new(&sw, 0, 1, 1, 0, None);
    let seq: Vec<_> = (0..9).map(|_| c.next(&sw)).collect();
    assert_eq!(seq[4], Write::Increment { page: 0 }, "wraps after 4 pages");
    let mut d = Stream::new(&sw, 0, 1, 1, 5, Some(c.cursor));
    assert_eq!(d.next(&sw), Write::Increment { page: 1 });
}

#[test]
fn sweep_slices_partition_the_range() {
    let w = parse("sweep:from=0,to=1M").unwrap();
    let parts: Vec<_> = (0..3).map(|v| w.sweep_slice(v, 3)).collect();
    assert_eq!(parts, vec![(0, 85), (85, 170), (170, 256)]);
    let tiny = parse("sweep:from=0,to=8K").unwrap();
    assert!(tiny.check_vcpus(2).is_ok());
    assert_eq!(
        tiny.check_vcpus(3),
        Err(WorkloadError::FewerPagesThanVcpus { pages: 2, vcpus: 3 })
    );
}

#[test]
fn parses_the_new_kinds() {
    let z = parse("zipf:s=1.2,rate=10k,wws=1M").unwrap();
    assert!(matches!(z.pattern, Pattern::Zipf { pages: 256, s, .. } if s == 1.2));
    let z = parse("zipf:s=0.8,rate=max").unwrap();
    assert!(matches!(z.pattern, Pattern::Zipf { pages: 16384, .. }));
    let c = parse("compute:ops=1000,wws=64K").unwrap();
    assert_eq!(
        c.pattern,
        Pattern::Compute {
            ops: 1000,
            wws_pages: 16
        }
    );
    let p = parse("phases:idle@2s+hotset:wws=8M,rate=20k@3s").unwrap();
    let Pattern::Phases(ph) = &p.pattern else {
        panic!("{:?}", p.pattern)
    };
    assert_eq!(ph.items.len(), 2);
    assert_eq!(ph.period, std::time::Duration::from_secs(5));
    assert_eq!(p.rate, PageRate::PerSec(20_000.0));
}

#[test]
fn rejects_bad_new_specs_naming_the_problem() {
    for (spec, needle) in [
        ("zipf:rate=1k", "zipf needs s=S"),
        ("zipf:s=0,rate=1k", "s=\"0\" is not an exponent above 0"),
        ("zipf:s=-1,rate=1k", "s=\"-1\""),
        ("zipf:s=x,rate=1k", "s=\"x\""),
        ("zipf:s=1", "zipf needs rate"),
        ("zipf:s=1,rate=1k,wws=1G", "wws must be"),
        ("compute:wws=1M", "compute needs ops=N"),
        ("compute:ops=0,wws=1M", "ops=\"0\""),
        ("compute:ops=10", "compute needs ops=N"),
        ("compute:ops=10,wws=1M,rate=1k", "compute takes no \"rate\""),
        ("phases:", "phases needs SPEC@DURATION"),
        ("phases:idle", "phase \"idle\" has no @DURATION"),
        ("phases:idle@0s+uniform:rate=1k@0ms", "sum to zero time"),
        ("phases:idle@soon", "phase \"idle@soon\": bad @DURATION"),
        ("phases:busy@1s", "phase \"busy\": unknown kind \"busy\""),
        ("phases:phases:idle@1s@1s", "phases cannot nest"),
        ("phases:idle@1s+hotset:wws=1G,rate=1k@1s", "wws must be"),
        ("trace:", "trace needs a file"),
        (
            "trace:/nonexistent/t.txt",
            "trace \"/nonexistent/t.txt\": cannot read it",
        ),
    ] {
        let e = parse(spec).unwrap_err();
        let e = crate::util::error::error_chain(&e);
        assert!(e.contains(needle), "{spec}: {e}");
    }
}

#[test]
fn a_trace_is_read_with_its_faults_located() {
    let t = Trace::parse("# t_us page\n100 3\n\n50 7 # early\n250 3\n", 8).unwrap();
    assert_eq!(t.writes, vec![(50, 7), (100, 3), (250, 3)]);
    assert_eq!(t.period_us, 300, "the gap before the first write repeats");
    // Two vCPUs deal the endless sequence out between them.
    assert_eq!(t.at(0, 0, 2), (0, 50));
    assert_eq!(t.at(0, 1, 2), (1, 100));
    assert_eq!(t.at(1, 1, 2), (0, 350), "the second loop");
    for (text, needle) in [
        ("1 2\n3\n", "line 2: \"3\" is not `t_us page_index`"),
        ("1 2\nx 3\n", "line 2"),
        ("1 2 3\n", "line 1"),
        ("# nothing\n", "holds no writes"),
        (
            "1 2\n5 8\n",
            "line 2: page 8 is beyond the memory's 8 pages",
        ),
    ] {
        let e = Trace::parse(text, 8).unwrap_err().to_string();
        assert!(e.contains(needle), "{text:?}: {e}");
    }
}

#[test]
fn phases_follow_the_guest_clock_and_repeat() {
    use std::time::Duration;
    let p = parse("phases:idle@2s+uniform:rate=1k@0s+sweep:from=0,to=64K@1s").unwrap();
    let at = |ms| {
        let (l, left) = p.at(Duration::from_millis(ms));
        (l.pattern.clone(), left.unwrap())
    };
    assert_eq!(at(0), (Pattern::Idle, Duration::from_secs(2)));
    assert_eq!(at(1500).1, Duration::from_millis(500));
    let sweep = Pattern::Sweep {
        from_page: 0,
        to_page: 16,
    };
    assert_eq!(at(2000), (sweep.clone(), Duration::from_secs(1)));
    assert_eq!(at(3100).0, Pattern::Idle, "the list repeats");
    assert_eq!(at(5500).0, sweep);
}

/// The share of writes landing on the top 1 % of pages matches Zipf's law:
/// H(n/100, s) / H(n, s), within 2 points over 200k writes.
#[test]
fn zipf_skews_writes_as_the_law_says() {
    for s in [0.8, 1.0, 1.3] {
        let w = parse(&format!("zipf:s={s},rate=max")).unwrap();
        let n = w.page_count;
        let mut st = Stream::new(&w, 0, 1, 11, 0, None);
        let top = n / 100;
        let writes = 200_000;
        let hits = (0..writes).filter(|_| st.next(&w).page() < top).count();
        let h = |m: u64| (1..=m).map(|k| (k as f64).powf(-s)).sum::<f64>();
        let expected = h(top) / h(n);
        let share = hits as f64 / writes as f64;
        assert!(
            (share - expected).abs() < 0.02,
            "s={s}: top 1 % took {share:.3}, the law says {expected:.3}"
        );
    }
}

#[test]
fn a_compute_stream_writes_its_working_set() {
    let w = parse("compute:ops=100,wws=64K").unwrap();
    let mut st = Stream::new(&w, 0, 1, 3, 0, None);
    assert!((0..1000).all(|_| st.next(&w).page() < 16));
    let mut k = compute::Kernel::default();
    k.run(10_000);
}
