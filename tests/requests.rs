//! The post-copy request connection misused. By a fake source: a receiver
//! (its guest running on missing pages) fails at once naming what was
//! wrong, rather than waiting out its request timeout; a request connection
//! of another session is refused when it opens. By a fake destination: the
//! source stops serving and pushing at once, naming the bad request.

mod common;
use common::*;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use livemig::guest::process::{DeviceState, VcpuState};
use livemig::wire::protocol::{self, Frame, Hello, Message, StreamHello, REQUEST_STREAM, VERSION};

const PAGES: u64 = 256;
const SESSION: u64 = 7;

/// Far longer than any of these tests takes when the receiver notices.
const REQUEST_TIMEOUT_MS: &str = "60000";

/// A post-copy source's handshake with a real receiver, opening the request
/// connection with `session`.
fn postcopy_hello(addr: &str, session: u64) -> (TcpStream, TcpStream) {
    let mut ctl = TcpStream::connect(addr).unwrap();
    let hello = Message::Hello(Hello {
        version: VERSION,
        page_size: 4096,
        memory_bytes: PAGES * 4096,
        streams: 1,
        session: SESSION,
        postcopy: true,
    });
    protocol::write_message(&mut ctl, &hello).unwrap();
    protocol::read_handshake::<protocol::HelloAck>(&mut ctl).unwrap();
    let mut req = TcpStream::connect(addr).unwrap();
    protocol::write_message(&mut req, &Message::stream_hello(REQUEST_STREAM, session)).unwrap();
    (ctl, req)
}

/// Switch a receiver over with every page missing and a guest that writes
/// at once, then wait for its first page request.
fn switched_over(addr: &str) -> (TcpStream, TcpStream) {
    let (mut ctl, mut req) = postcopy_hello(addr, SESSION);
    ctl.write_all(&protocol::discard_frame_header(0, PAGES as u32))
        .unwrap();
    let state = DeviceState {
        workload: "uniform:rate=max".parse().unwrap(),
        memory_bytes: PAGES * 4096,
        page_size: 4096,
        vcpus: vec![VcpuState {
            seed: 1,
            ops: 0,
            cursor: 0,
            work_ops: 0,
            clock_us: 0,
        }],
    };
    protocol::write_message(&mut ctl, &Message::device_state(state.to_bytes())).unwrap();
    protocol::expect_message::<protocol::Resumed>(&mut ctl, None).unwrap();
    assert!(matches!(
        protocol::read_frame(&mut req, None),
        Ok(Frame::Message(Message::PageRequest(_)))
    ));
    (ctl, req)
}

/// Answer the first request with `reply`; the receiver must fail at once,
/// with every page still missing, naming `needles`.
fn answered_with(reply: &[u8], needles: &[&str]) {
    let (child, addr) = receiver(&[], &[("LIVEMIG_REQUEST_TIMEOUT_MS", REQUEST_TIMEOUT_MS)]);
    let (ctl, mut req) = switched_over(&addr);
    let t = Instant::now();
    req.write_all(reply).unwrap();
    let output = child.wait_with_output().unwrap();
    let waited = t.elapsed();
    let r = Run {
        output,
        report: None,
    };
    let mut all = vec!["post-copy failed with 256 pages still missing"];
    all.extend_from_slice(needles);
    r.assert_fails_with(&all);
    // Not the request timeout: the reply itself was refused.
    assert!(!r.stderr().contains("has not arrived"), "{}", r.stderr());
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    drop((ctl, req));
}

#[test]
fn a_reply_that_is_not_pages_fails_post_copy_at_once() {
    let reply = Message::round_start(0, false).encode();
    answered_with(&reply, &["unexpected RoundStart on the request connection"]);
}

#[test]
fn a_reply_outside_memory_fails_post_copy_at_once() {
    let mut reply = protocol::pages_frame_header(PAGES - 1, 2, 4096).to_vec();
    reply.extend(vec![1u8; 2 * 4096]);
    answered_with(
        &reply,
        &[
            "the request connection",
            "out of range",
            "memory has 256 pages",
        ],
    );
}

#[test]
fn a_reply_that_is_not_a_frame_fails_post_copy_at_once() {
    answered_with(&[0xee; 64], &["the request connection"]);
}

#[test]
fn a_request_connection_of_another_session_is_refused() {
    let (child, addr) = receiver(&[], &[]);
    let (ctl, req) = postcopy_hello(&addr, SESSION + 1);
    let output = child.wait_with_output().unwrap();
    Run {
        output,
        report: None,
    }
    .assert_fails_with(&["request connection", "session 0x8", "0x7"]);
    drop((ctl, req));
}

/// A destination that switches over, then sends `request` on the request
/// connection and swallows whatever the source pushes.
fn fake_destination(request: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut ctl, _) = l.accept().unwrap();
        let hello: Hello = protocol::read_handshake(&mut ctl).unwrap();
        let limits = hello.limits().unwrap();
        protocol::write_message(&mut ctl, &Message::hello_ack()).unwrap();
        let (mut req, _) = l.accept().unwrap();
        let _: StreamHello = protocol::read_handshake(&mut req).unwrap();
        // The pages to fetch, then the device state: resume at once.
        while let Ok(Frame::Discard { .. }) = protocol::read_frame(&mut ctl, Some(&limits)) {}
        protocol::write_message(&mut ctl, &Message::resumed(1000, 0)).unwrap();
        req.write_all(&request).unwrap();
        let _ = std::io::copy(&mut ctl, &mut std::io::sink());
        let _ = std::io::copy(&mut req, &mut std::io::sink());
    });
    addr
}

/// The source is told it has a destination running; then a bad request
/// comes: the source must not answer it (nor wait 30 s for an ack that
/// will not come), and says which request it refused. Its guest is not
/// resumed: the destination's has run.
#[test]
fn a_bad_page_request_fails_the_source_at_once_naming_it() {
    let out_of_range = Message::page_request(2040, 16, 0).encode();
    let not_a_request = Message::round_ack(0).encode();
    for (request, needle) in [
        (
            out_of_range,
            "page run 2040+16 out of range (memory has 2048 pages)",
        ),
        (not_a_request, "RoundAck"),
    ] {
        let addr = fake_destination(request);
        let t = Instant::now();
        let r = run(&[
            "send",
            "--to",
            &addr,
            "--quiet",
            "--mem",
            "8M",
            "--warmup",
            "50ms",
            "--workload",
            "uniform:rate=10k",
            "--mode",
            "postcopy",
            "--bandwidth",
            "20mbit",
        ]);
        r.assert_fails_with(&[
            "serving page requests",
            needle,
            "source guest was not resumed",
        ]);
        // Well inside the 30 s the source waits for a silent receiver
        // (8 MiB at 20 Mbit/s would take over 3 s to push).
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        let rep = r.report();
        assert_eq!(rep["status"], "failed");
        assert_eq!(rep["source_guest_kept_running"], false);
        assert_gone(&rep["source_guest_pid"]);
    }
}
