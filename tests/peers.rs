//! Fake senders that break off in the middle of a round: the receiver
//! says which connection failed, at once, not after its 30 s timeout.

mod common;
use common::*;

use std::time::{Duration, Instant};

use livemig::wire::protocol::{self, Message};

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
