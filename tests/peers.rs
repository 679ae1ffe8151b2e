//! Fake senders that break off in the middle of a round: the receiver
//! says which connection failed, at once, not after its 30 s timeout.

mod common;
use common::*;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use livemig::wire::protocol::{self, Message};

/// A fake sender's handshake with `streams` data connections over 1 MiB.
fn fake_sender(addr: &str, streams: u32) -> (TcpStream, Vec<TcpStream>) {
    let session = 7;
    let mut ctl = TcpStream::connect(addr).unwrap();
    let hello = Message::hello(4096, 1 << 20, streams, session);
    protocol::write_message(&mut ctl, &hello).unwrap();
    protocol::read_handshake::<protocol::HelloAck>(&mut ctl).unwrap();
    let data = (0..streams)
        .map(|index| {
            let mut s = TcpStream::connect(addr).unwrap();
            protocol::write_message(&mut s, &Message::stream_hello(index, session)).unwrap();
            s
        })
        .collect();
    (ctl, data)
}

#[test]
fn a_data_connection_closed_mid_round_fails_the_round_at_once() {
    let (child, addr) = receiver(&[], &[]);
    let t = Instant::now();
    let (mut ctl, mut data) = fake_sender(&addr, 2);
    protocol::write_message(&mut ctl, &Message::round_start(0, false)).unwrap();
    // Connection 1 goes away without its RoundEnd; connection 0 ends the
    // round properly, and so does the control connection.
    drop(data.pop());
    protocol::write_message(&mut data[0], &Message::round_end(0, 0)).unwrap();
    protocol::write_message(&mut ctl, &Message::round_end(0, 0)).unwrap();
    let output = child.wait_with_output().unwrap();
    // Well inside the receiver's 30 s wait for a silent connection.
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    Run {
        output,
        report: None,
    }
    .assert_fails_with(&["data connection 1 closed before it ended round 0"]);
}
