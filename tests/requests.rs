//! The post-copy request connection misused by a fake source: a receiver
//! (its guest running on missing pages) fails at once naming what was
//! wrong, rather than waiting out its request timeout; and a request
//! connection of another session is refused when it opens.

mod common;
use common::*;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use livemig::guest::process::{DeviceState, VcpuState};
use livemig::wire::protocol::{self, Frame, Hello, Message, REQUEST_STREAM, VERSION};

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
