//! Verification proven to fail. A proxy between a real `livemig send` and a
//! real `livemig receive` reads the sender's frames with the library's own
//! protocol reader and forwards them with one fault: a flipped byte, a
//! dropped run, a stale page delivered last. Each fault keeps the stream
//! well formed, so only verification can find it: both ends must name the
//! mismatched pages, exit 1 and write a report saying "failed".

mod common;
use common::*;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;

use livemig::wire::protocol::{self, Frame, Hello, Kind, Message, PageRun, RoundEnd, RoundStart};

/// What the proxy does to the stream.
#[derive(Clone, Copy)]
enum Fault {
    /// Flip one byte of the fourth page of round 0's first raw run.
    FlipByte,
    /// Leave out round 0's first raw run and lower its `RoundEnd` count to match.
    DropRun,
    /// Keep every page of round 0; after a later round's fresh version of a
    /// page whose content changed, send the round-0 version again (and
    /// count it in that round's `RoundEnd`).
    Stale,
}

/// What the proxy did: the pages it spoiled (first, count) and how many
/// stale copies it sent.
#[derive(Debug, Default)]
struct Done {
    spoiled: Option<(u64, u64)>,
    stale_sent: u32,
}

/// A proxy to the receiver at `to` for one connection (one stream), with
/// `fault` injected; its address, and the thread that tells what it did
/// once the sender has closed.
fn proxy(to: String, fault: Fault) -> (String, JoinHandle<Done>) {
    // Bound before the sender starts, so it is ready when it connects.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let forward = std::thread::spawn(move || {
        let (mut from, _) = l.accept().unwrap();
        let mut to = TcpStream::connect(&to).unwrap();
        let (mut back_from, mut back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let done = forward(&mut from, &mut to, fault);
        let _ = to.shutdown(std::net::Shutdown::Write);
        done
    });
    (addr, forward)
}

/// Forward frames until the sender closes, injecting `fault`.
fn forward(from: &mut TcpStream, to: &mut TcpStream, fault: Fault) -> Done {
    let hello: Hello = protocol::read_handshake(from).unwrap();
    let (limits, ps) = (hello.limits().unwrap(), hello.page_size as usize);
    to.write_all(&Message::Hello(hello).encode()).unwrap();
    let mut done = Done::default();
    let (mut round, mut added) = (0u32, 0u64);
    // Stale: round 0's version of every page, and the page chosen.
    let (mut first_seen, mut stale) = (HashMap::<u64, Vec<u8>>::new(), None::<u64>);
    let mut out = Vec::new();
    loop {
        // The sender closes after its verdict: then this stream ends.
        let Ok(frame) = protocol::read_frame(from, Some(&limits)) else {
            return done;
        };
        out.clear();
        match frame {
            Frame::Message(Message::RoundEnd(RoundEnd { round: r, pages })) => {
                let pages = match (fault, done.spoiled) {
                    (Fault::DropRun, Some((_, n))) if r == 0 => pages - n,
                    _ => pages + added,
                };
                out.extend(Message::round_end(r, pages).encode());
            }
            Frame::Message(m) => {
                if let Message::RoundStart(RoundStart { round: r, .. }) = m {
                    (round, added) = (r, 0);
                }
                out.extend(m.encode());
            }
            Frame::Run(PageRun::Pages { first_page, count }) => {
                let mut bytes = vec![0u8; count as usize * ps];
                protocol::read_bulk(from, &mut bytes, Kind::Pages).unwrap();
                let first_raw = round == 0 && done.spoiled.is_none();
                match fault {
                    Fault::FlipByte if first_raw => {
                        let page = 3.min(u64::from(count) - 1);
                        bytes[page as usize * ps + 100] ^= 0x5a;
                        done.spoiled = Some((first_page + page, 1));
                    }
                    Fault::DropRun if first_raw => {
                        done.spoiled = Some((first_page, u64::from(count)));
                        continue;
                    }
                    Fault::Stale if round == 0 => {
                        for (i, page) in bytes.chunks_exact(ps).enumerate() {
                            first_seen.insert(first_page + i as u64, page.to_vec());
                        }
                    }
                    _ => {}
                }
                out.extend(protocol::pages_frame_header(
                    first_page,
                    count,
                    hello.page_size,
                ));
                out.extend(&bytes);
                if let (Fault::Stale, true) = (fault, round > 0) {
                    let pages = first_page..first_page + u64::from(count);
                    // The first page here that differs from its round-0 version.
                    let changed = |p: &u64| {
                        let i = (p - first_page) as usize * ps;
                        first_seen[p] != bytes[i..i + ps]
                    };
                    if stale.is_none() {
                        stale = pages.clone().find(changed);
                    }
                    if let Some(p) = stale.filter(|p| pages.contains(p)) {
                        out.extend(protocol::pages_frame_header(p, 1, hello.page_size));
                        out.extend(&first_seen[&p]);
                        (added, done.stale_sent) = (added + 1, done.stale_sent + 1);
                        done.spoiled = Some((p, 1));
                    }
                }
            }
            Frame::Run(PageRun::ZeroPages { first_page, count }) => {
                out.extend(protocol::zero_frame_header(first_page, count));
            }
            Frame::Digests { first_page, count } => {
                let digests = protocol::read_digests(from, count).unwrap();
                out.extend(protocol::digests_frame_header(first_page, count));
                digests.iter().for_each(|d| out.extend(d.to_le_bytes()));
            }
            other => panic!("the proxy forwards no {other:?}"),
        }
        if to.write_all(&out).is_err() {
            return done;
        }
    }
}

/// Both ends of a migration through a proxy with `fault`.
fn through_proxy(fault: Fault, extra: &[&str]) -> (Run, Run, Done) {
    let dir = tempfile::tempdir().unwrap();
    let rx_json = dir.path().join("rx.json");
    let (rx, addr) = receiver(&["--json".as_ref(), rx_json.as_os_str()], &[]);
    let (addr, proxy) = proxy(addr, fault);
    let mut args = vec![
        "send",
        "--to",
        &addr,
        "--quiet",
        "--mem",
        "8M",
        "--warmup",
        "50ms",
        "--no-zero-pages",
    ];
    args.extend_from_slice(extra);
    let tx = run(&args);
    let output = rx.wait_with_output().unwrap();
    let report = std::fs::read(&rx_json)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    let done = proxy.join().unwrap();
    (tx, Run { output, report }, done)
}

/// Both ends failed naming `count` mismatched pages from `first` on.
fn assert_both_fail(tx: &Run, rx: &Run, (first, count): (u64, u64)) {
    let named = [
        &format!("{count} mismatched pages")[..],
        &format!("first: page {first}"),
    ];
    tx.assert_fails_with(&named);
    rx.assert_fails_with(&named);
    for (end, r) in [("send", tx), ("receive", rx)] {
        let rep = r.report();
        assert_eq!(rep["status"], "failed", "{end}: {rep:#}");
        assert_eq!(rep["mismatched_pages"], count, "{end}: {rep:#}");
        let error = rep["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{end}: {rep:#}"));
        assert!(error.contains(named[0]), "{end}: {error}");
    }
}

#[test]
fn a_flipped_byte_is_found_by_verification() {
    let (tx, rx, done) = through_proxy(Fault::FlipByte, &["--workload", "idle"]);
    let spoiled = done
        .spoiled
        .expect("a raw page of round 0 passed the proxy");
    assert_both_fail(&tx, &rx, spoiled);
}

#[test]
fn a_dropped_run_is_found_by_verification() {
    let (tx, rx, done) = through_proxy(Fault::DropRun, &["--workload", "idle"]);
    let spoiled = done.spoiled.expect("a raw run of round 0 passed the proxy");
    assert_both_fail(&tx, &rx, spoiled);
}

#[test]
fn a_stale_page_delivered_last_is_found_by_verification() {
    // 64 hot pages rewritten all along, so later rounds resend them: the
    // rate limit makes round 0 last 0.7 s, in which the guest writes every
    // hot page many times over, however fast the machine.
    let hot = [
        "--workload",
        "hotset:wws=256K,rate=20k,hot=1",
        "--policy",
        "fixed:4",
        "--bandwidth",
        "100mbit",
    ];
    let (tx, rx, done) = through_proxy(Fault::Stale, &hot);
    assert!(
        done.stale_sent > 0,
        "no page changed after round 0: {done:?}"
    );
    let spoiled = done.spoiled.expect("a stale page was sent");
    assert_both_fail(&tx, &rx, spoiled);
}
