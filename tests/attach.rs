//! `dirtyrate --pid` refuses processes that are not livemig guests, however
//! much they look like one. Its own test binary: the process must hold only
//! the memfds each case makes (other tests map guest memory in-process).

mod common;

use livemig::guest::control::{block_len, Control, CONTROL_NAME};
use livemig::guest::memory::{SharedRegion, GUEST_RAM_NAME};

fn attach(pid: &str) -> common::Run {
    common::run(&["dirtyrate", "--quiet", "--pid", pid])
}

#[test]
fn dirtyrate_refuses_what_is_not_a_guest() {
    let mut sleeper = std::process::Command::new("sleep")
        .arg("10")
        .spawn()
        .unwrap();
    let other = sleeper.id().to_string();
    attach(&other).assert_fails_with(&[
        &format!("process {other} is not a livemig guest"),
        "livemig-guest-ram",
    ]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    attach("0").assert_fails_with(&["process 0 is not a livemig guest", "no such process"]);

    // This process, made to look more and more like a guest.
    let me = std::process::id().to_string();
    let _ram = SharedRegion::create(GUEST_RAM_NAME, 1 << 20).unwrap();
    attach(&me).assert_fails_with(&["not a livemig guest", "no livemig-control memfd"]);
    {
        // Too small to hold a control block: must not be mapped (SIGBUS).
        let _short = SharedRegion::create(CONTROL_NAME, 4096).unwrap();
        attach(&me).assert_fails_with(&["not a livemig guest", "too small"]);
    }
    {
        let _unmarked = SharedRegion::create(CONTROL_NAME, block_len()).unwrap();
        attach(&me).assert_fails_with(&["not a livemig guest", "not a control block"]);
    }
    let _control = Control::create().unwrap();
    attach(&me).assert_fails_with(&["not a livemig guest", "names no guest"]);
}
