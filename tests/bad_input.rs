//! Bad input never crashes, hangs or corrupts: one clear error line, exit
//! code 1, and the source guest is never left stopped or orphaned.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;

use livemig::wire::protocol::{self, Kind, Message};

#[test]
fn unparsable_flags_name_the_value() {
    for (args, needles) in [
        (&["--workload", "busy"][..], &["--workload", "\"busy\""][..]),
        (
            &["--workload", "hotset:wws=64M,rate=1k"],
            &["--workload", "wws"],
        ),
        (&["--bandwidth", "fast"], &["--bandwidth", "\"fast\""]),
        (&["--mem", "lots"], &["--mem", "\"lots\""]),
        (&["--policy", "fixed:0"], &["--policy", "fixed:0"]),
        (&["--tracker", "pml"], &["--tracker", "\"pml\""]),
        (&["--max-time", "soon"], &["--max-time", "soon"]),
        (
            &["--workload", "uniform:rate=1e300"],
            &["--workload", "between"],
        ),
        (&["--bandwidth", "100kbit"], &["--bandwidth", "below 1mbit"]),
        (
            &["--workload", "sweep:from=0,to=8K", "--vcpus", "4"],
            &["--workload", "fewer than --vcpus 4"],
        ),
    ] {
        migrate(args).assert_fails_with(needles);
    }
}

#[test]
fn memory_larger_than_the_machine() {
    migrate(&["--mem", "64T"]).assert_fails_with(&["--mem", "available"]);
    run(&["send", "--to", "127.0.0.1:9", "--mem", "64T"])
        .assert_fails_with(&["--mem", "available"]);
}

#[test]
fn port_in_use() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = livemig()
        .args(["receive", "--listen", &addr])
        .output()
        .unwrap();
    let r = Run {
        output: out,
        report: None,
    };
    r.assert_fails_with(&["cannot listen on", &addr, "in use"]);
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn send_to(addr: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "send",
        "--to",
        addr,
        "--quiet",
        "--mem",
        "8M",
        "--warmup",
        "50ms",
        "--workload",
        "uniform:rate=10k",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// After a failed send: the source guest was resumed and is gone now.
fn assert_source_resumed_and_reaped(r: &Run) {
    let rep = r.report();
    assert_eq!(rep["status"], "failed");
    assert_eq!(rep["source_guest_kept_running"], true, "{rep:#}");
    assert_gone(&rep["source_guest_pid"]);
}

#[test]
fn connection_refused() {
    let r = send_to(&free_port(), &["--workload", "uniform:rate=10k"]);
    r.assert_fails_with(&["cannot connect to", "refused", "source guest was resumed"]);
    assert_source_resumed_and_reaped(&r);
}

/// A one-connection server running `f` on the accepted socket.
fn fake_receiver(f: impl FnOnce(TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            f(s)
        }
    });
    addr
}

/// Keep a fake receiver's end open until the sender closes its own: closing
/// first, with the sender's bytes unread, would reset the connection and
/// could discard the reply before the sender read it, however long we wait.
fn drain_until_closed(mut s: TcpStream) {
    let _ = std::io::copy(&mut s, &mut std::io::sink());
}

#[test]
fn peer_speaking_another_protocol() {
    let addr = fake_receiver(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        drain_until_closed(s);
    });
    let r = send_to(&addr, &[]);
    r.assert_fails_with(&["not a livemig peer"]);
    assert_source_resumed_and_reaped(&r);
}

#[test]
fn peer_speaking_another_version() {
    let addr = fake_receiver(|mut s| {
        let mut hello = [0u8; 48];
        let _ = s.read_exact(&mut hello);
        // A HelloAck of a version after this one, framed by hand.
        let mut payload = protocol::MAGIC.to_vec();
        payload.extend_from_slice(&(protocol::VERSION + 1).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        let header = protocol::Header {
            kind: Kind::HelloAck,
            flags: 0,
            len: payload.len() as u32,
        };
        let _ = s.write_all(&header.encode());
        let _ = s.write_all(&payload);
        drain_until_closed(s);
    });
    let v = format!("version {}", protocol::VERSION + 1);
    send_to(&addr, &[]).assert_fails_with(&[&v]);
}

/// A receiver that plays the protocol honestly up to the verdict, then
/// claims it verified only 5 pages: the sender must not call that success.
#[test]
fn a_verdict_that_skips_pages_is_refused() {
    use livemig::wire::protocol::{
        read_frame, Frame, Hello, Limits, PageRun, RoundEnd, RoundStart,
    };
    let addr = fake_receiver(|mut s| {
        let Ok(h) = protocol::read_handshake::<Hello>(&mut s) else {
            return;
        };
        let limits: Limits = h.limits().unwrap();
        protocol::write_message(&mut s, &Message::hello_ack()).unwrap();
        let mut page = vec![0u8; limits.page_size as usize];
        let mut stop_and_copy = false;
        loop {
            match read_frame(&mut s, Some(&limits)) {
                Ok(Frame::Run(PageRun::Pages { count, .. })) => {
                    for _ in 0..count {
                        s.read_exact(&mut page).unwrap();
                    }
                }
                Ok(Frame::Digests { count, .. }) => {
                    protocol::read_digests(&mut s, count).unwrap();
                }
                Ok(Frame::Message(Message::RoundStart(RoundStart {
                    stop_and_copy: sc, ..
                }))) => stop_and_copy = sc,
                // Ack pre-copy rounds; the stop-and-copy round is not acked.
                Ok(Frame::Message(Message::RoundEnd(RoundEnd { round, .. }))) if !stop_and_copy => {
                    protocol::write_message(&mut s, &Message::round_ack(round)).unwrap();
                }
                Ok(Frame::Message(Message::DeviceState(_))) => {
                    protocol::write_message(&mut s, &Message::resumed(1000, 0)).unwrap();
                }
                Ok(Frame::Message(Message::Complete(_))) => {
                    let lie = Message::verdict(5, 0, None);
                    protocol::write_message(&mut s, &lie).unwrap();
                    return drain_until_closed(s);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let r = send_to(&addr, &["--workload", "idle"]);
    r.assert_fails_with(&["compared only 5 of 2048 pages"]);
    assert_eq!(r.report()["status"], "failed");
}

#[test]
fn source_guest_dying_mid_migration() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let child = livemig()
        .args([
            "migrate",
            "--quiet",
            "--mem",
            "16M",
            "--warmup",
            "100ms",
            "--bandwidth",
            "100mbit",
        ])
        .args(["--workload", "uniform:rate=10k", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The source guest is the child of livemig's main thread.
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let guest = (0..200)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let pids = std::fs::read_to_string(&children).ok()?;
            pids.split_whitespace().next().map(str::to_owned)
        })
        .expect("the source guest started");
    // Into round 0: the sender claims the guest once it is set up, warms
    // up for 100 ms, then sends 16 MiB at 100 Mbit/s (1.3 s at least);
    // after the claim and 300 ms, the kill cannot come before round 0.
    let found = wait_until("the source guest's control block", || {
        livemig::guest::find::find(guest.parse().ok()?).ok()
    });
    wait_until("the sender's claim on its guest", || {
        (found
            .control
            .block()
            .owner
            .load(std::sync::atomic::Ordering::SeqCst)
            != 0)
            .then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(std::process::Command::new("kill")
        .args(["-9", &guest])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: std::fs::read(&json)
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap()),
    };
    r.assert_fails_with(&["guest process", "exited"]);
    assert_eq!(r.report()["status"], "failed");
}

#[test]
fn peer_vanishing_mid_round() {
    let addr = fake_receiver(|mut s| {
        let _ = protocol::read_handshake::<protocol::Hello>(&mut s);
        let _ = protocol::write_message(&mut s, &Message::hello_ack());
        // Take about 1 MiB of round 0, then vanish.
        let mut buf = vec![0u8; 1 << 20];
        let _ = s.read_exact(&mut buf);
    });
    let r = send_to(
        &addr,
        &[
            "--mem",
            "32M",
            "--bandwidth",
            "200mbit",
            "--workload",
            "hotset:wws=4M,rate=20k",
        ],
    );
    r.assert_fails_with(&["round 0", "source guest was resumed"]);
    assert_source_resumed_and_reaped(&r);
}

/// Feed `bytes` to a fresh receiver and return how it ended.
fn receiver_fed(bytes: &[u8]) -> Run {
    let (child, addr) = receiver(&[], &[]);
    let mut s = TcpStream::connect(&addr).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let output = child.wait_with_output().unwrap();
    Run {
        output,
        report: None,
    }
}

fn hello(version: u32, mem: u64) -> Vec<u8> {
    let mut payload = protocol::MAGIC.to_vec();
    payload.extend_from_slice(&version.to_le_bytes());
    payload.extend_from_slice(&4096u32.to_le_bytes());
    payload.extend_from_slice(&mem.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes()); // streams
    payload.extend_from_slice(&[0; 12]); // reserved, session
    let header = protocol::Header {
        kind: Kind::Hello,
        flags: 0,
        len: payload.len() as u32,
    };
    [header.encode().to_vec(), payload].concat()
}

#[test]
fn receiver_rejects_garbage() {
    receiver_fed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").assert_fails_with(&["not a livemig peer"]);
}

#[test]
fn receiver_rejects_another_version() {
    receiver_fed(&hello(9, 1 << 20)).assert_fails_with(&["version 9"]);
}

#[test]
fn receiver_writes_its_report_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rx.json");
    let (mut child, addr) = receiver(&["--json".as_ref(), json.as_os_str()], &[]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&hello(protocol::VERSION, 1 << 20)).unwrap();
    drop(s); // vanish after the handshake
    assert!(!child.wait().unwrap().success());
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(rep["status"], "failed");
    let err = rep["error"].as_str().unwrap();
    assert!(err.contains("waiting for round 0"), "{err}");
}

#[test]
fn receiver_rejects_memory_it_cannot_hold() {
    receiver_fed(&hello(protocol::VERSION, 1 << 46)).assert_fails_with(&["available"]);
}

#[test]
fn receiver_rejects_a_page_run_out_of_range() {
    let mut bytes = hello(protocol::VERSION, 1 << 20); // 256 pages
    bytes.extend(Message::round_start(0, false).encode());
    bytes.extend(protocol::pages_frame_header(250, 10, 4096));
    bytes.extend(vec![0u8; 10 * 4096]);
    receiver_fed(&bytes).assert_fails_with(&["250", "out of range"]);
}

#[test]
fn receiver_wants_digests_in_page_order() {
    let mut bytes = hello(protocol::VERSION, 1 << 20); // 256 pages
    for (round, stop_and_copy, pages) in [(0, false, 256), (1, true, 0)] {
        bytes.extend(Message::round_start(round, stop_and_copy).encode());
        if pages > 0 {
            bytes.extend(protocol::pages_frame_header(0, pages, 4096));
            bytes.extend(vec![1u8; pages as usize * 4096]);
        }
        bytes.extend(Message::round_end(round, u64::from(pages)).encode());
    }
    let state = livemig::guest::process::DeviceState {
        workload: "idle".parse().unwrap(),
        memory_bytes: 1 << 20,
        page_size: 4096,
        vcpus: vec![livemig::guest::process::VcpuState {
            seed: 1,
            ops: 0,
            cursor: 0,
            work_ops: 0,
            clock_us: 0,
        }],
    };
    bytes.extend(Message::device_state(state.to_bytes()).encode());
    bytes.extend(protocol::digests_frame_header(5, 1));
    bytes.extend(0u64.to_le_bytes());
    receiver_fed(&bytes).assert_fails_with(&["digests for page 5", "page 0 was due"]);
}

/// A valid `Discard` where pages belong: on a data connection it once
/// crashed the receiver (an unreachable! in the data path).
#[test]
fn receiver_refuses_a_discard_where_pages_belong() {
    let (child, addr) = receiver(&[], &[]);
    let (mut ctl, mut data) = fake_sender(&addr, 2);
    protocol::write_message(&mut ctl, &Message::round_start(0, false)).unwrap();
    data[0]
        .write_all(&protocol::discard_frame_header(0, 1))
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&["data connection 0", "unexpected frame Discard"]);
    drop((ctl, data));

    // On the control connection, in the middle of a round.
    let mut bytes = Message::round_start(0, false).encode();
    bytes.extend(protocol::discard_frame_header(0, 1));
    let (child, addr) = receiver(&[], &[]);
    let (mut ctl, _) = fake_sender(&addr, 1);
    ctl.write_all(&bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&["round 0", "unexpected discard"]);
}

#[test]
fn receiver_reports_a_truncated_stream() {
    let mut bytes = hello(protocol::VERSION, 1 << 20);
    bytes.extend(Message::round_start(0, false).encode());
    bytes.extend(protocol::pages_frame_header(0, 4, 4096));
    bytes.extend(vec![7u8; 4096]); // 1 of 4 pages, then EOF
    receiver_fed(&bytes).assert_fails_with(&["truncated", "round 0"]);
}

#[test]
fn a_tracker_the_kernel_lacks_is_refused_with_the_reason() {
    // soft-dirty needs CONFIG_MEM_SOFT_DIRTY; where the kernel has it, the
    // tracker must work instead.
    let r = migrate(&["--tracker", "soft-dirty", "--workload", "uniform:rate=20k"]);
    match livemig::guest::dirty::TrackerKind::SoftDirty.check_kernel() {
        Err(_) => r.assert_fails_with(&[
            "--tracker soft-dirty",
            "CONFIG_MEM_SOFT_DIRTY",
            "use --tracker uffd-wp",
        ]),
        Ok(()) => {
            assert_verified(&r);
        }
    }
}

#[test]
fn dirtyrate_refuses_bad_flags_naming_them() {
    for (args, needles) in [
        (&["--tracker", "pml"][..], &["--tracker", "\"pml\""][..]),
        (&["--workload", "busy"], &["--workload", "\"busy\""]),
        (&["--duration", "soon"], &["--duration", "soon"]),
        (&["--mem", "64T"], &["--mem", "available"]),
    ] {
        let mut all = vec!["dirtyrate", "--quiet"];
        all.extend_from_slice(args);
        run(&all).assert_fails_with(needles);
    }
}

/// A proxy to the receiver at `to` (every connection, data streams too)
/// that spoils the payload (after the run header) of the first frame of
/// kind `kind` the sender sends.
fn spoiling_proxy(to: String, kind: Kind, spoil: fn(&mut [u8])) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let spoiled = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for from in l.incoming() {
            let (Ok(mut from), Ok(mut to)) = (from, TcpStream::connect(&to)) else {
                return;
            };
            let spoiled = Arc::clone(&spoiled);
            let (mut back_from, mut back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
            std::thread::spawn(move || {
                loop {
                    let mut h = [0u8; 8];
                    if from.read_exact(&mut h).is_err() {
                        break;
                    }
                    let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
                    let mut p = vec![0u8; len];
                    if from.read_exact(&mut p).is_err() {
                        break;
                    }
                    if u16::from_le_bytes([h[0], h[1]]) == kind as u16
                        && !spoiled.swap(true, Ordering::SeqCst)
                    {
                        spoil(&mut p[16..]);
                    }
                    if to.write_all(&h).and_then(|_| to.write_all(&p)).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn corrupt_reduced_payloads_fail_cleanly_and_keep_the_source() {
    type Spoil = fn(&mut [u8]);
    let cases: [(Kind, Spoil, &[&str]); 4] = [
        (
            Kind::CompressedPages,
            |p| p.fill(0xff),
            &["--compress", "lz4"],
        ),
        (
            Kind::CompressedPages,
            |p| p.fill(0xff),
            &["--compress", "lz4", "--streams", "3"],
        ),
        (
            Kind::CompressedPages,
            |p| p[..4].copy_from_slice(b"junk"),
            &["--compress", "zstd"],
        ),
        (
            Kind::XbzrlePages,
            |p| p[..2].copy_from_slice(&u16::MAX.to_le_bytes()),
            &["--xbzrle", "1M", "--policy", "fixed:6"],
        ),
    ];
    for (kind, spoil, flags) in cases {
        let (rx, addr) = receiver(&[], &[]);
        let proxy = spoiling_proxy(addr, kind, spoil);
        let mut args = vec!["--workload", "hotset:wws=64K,rate=20k,hot=1,random=0.1"];
        args.extend_from_slice(flags);
        let r = send_to(&proxy, &args);
        r.assert_fails_with(&["refused", "corrupt", &kind.to_string()]);
        assert_source_resumed_and_reaped(&r);
        let out = rx.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("corrupt payload"), "{err}");
    }
}

/// A source that switches to post-copy, then answers no page request and
/// pushes nothing: the destination must not wait on its guest's faults
/// forever, but give up after the request timeout, naming the page.
#[test]
fn postcopy_requests_that_are_never_answered_time_out() {
    use livemig::wire::protocol::{Hello, REQUEST_STREAM, VERSION};
    let (child, addr) = receiver(&[], &[("LIVEMIG_REQUEST_TIMEOUT_MS", "1000")]);
    let (mem, session) = (1u64 << 20, 7u64); // 256 pages
    let mut ctl = TcpStream::connect(&addr).unwrap();
    let hello = Message::Hello(Hello {
        version: VERSION,
        page_size: 4096,
        memory_bytes: mem,
        streams: 1,
        session,
        postcopy: true,
    });
    protocol::write_message(&mut ctl, &hello).unwrap();
    protocol::read_handshake::<protocol::HelloAck>(&mut ctl).unwrap();
    let mut req = TcpStream::connect(&addr).unwrap();
    protocol::write_message(&mut req, &Message::stream_hello(REQUEST_STREAM, session)).unwrap();
    // Every page is missing; the guest writes at once.
    ctl.write_all(&protocol::discard_frame_header(0, 256))
        .unwrap();
    let state = livemig::guest::process::DeviceState {
        workload: "uniform:rate=max".parse().unwrap(),
        memory_bytes: mem,
        page_size: 4096,
        vcpus: vec![livemig::guest::process::VcpuState {
            seed: 1,
            ops: 0,
            cursor: 0,
            work_ops: 0,
            clock_us: 0,
        }],
    };
    protocol::write_message(&mut ctl, &Message::device_state(state.to_bytes())).unwrap();
    assert!(matches!(
        protocol::expect_message::<protocol::Resumed>(&mut ctl, None),
        Ok(protocol::Resumed { .. })
    ));
    // A request arrives, and is left unanswered.
    assert!(matches!(
        protocol::read_frame(&mut req, None),
        Ok(protocol::Frame::Message(Message::PageRequest(_)))
    ));
    let t = std::time::Instant::now();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert!(
        err.contains("post-copy failed with 256 pages still missing")
            && err.contains("has not arrived: the source is gone"),
        "{err}"
    );
    drop((ctl, req));
}

/// A data connection that names another session is refused, not adopted
/// into this migration.
#[test]
fn receiver_refuses_a_data_connection_of_another_session() {
    let (child, addr) = receiver(&[], &[]);
    let mut ctl = TcpStream::connect(&addr).unwrap();
    protocol::write_message(&mut ctl, &Message::hello(4096, 1 << 20, 2, 11)).unwrap();
    protocol::read_handshake::<protocol::HelloAck>(&mut ctl).unwrap();
    let mut data = TcpStream::connect(&addr).unwrap();
    protocol::write_message(&mut data, &Message::stream_hello(0, 12)).unwrap();
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&["stream 0 of session 0xc", "of session 0xb"]);
}

/// `receive --mem` made memory of one size; a sender with another is
/// refused at the handshake, and both ends say which sizes.
#[test]
fn a_receiver_prepared_for_another_size_refuses_the_sender() {
    let (rx, addr) = receiver(&["--mem".as_ref(), "16M".as_ref()], &[]);
    let r = send_to(&addr, &[]);
    let sizes = ["guest has 8.0 MiB", "prepared for 16.0 MiB"];
    r.assert_fails_with(&[sizes[0], sizes[1], "source guest was resumed"]);
    assert_source_resumed_and_reaped(&r);
    let output = rx.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&sizes);
}

/// A receiver that acknowledges another round than the one that ended:
/// the sender must not take it as delivery of this round's pages.
#[test]
fn a_round_ack_for_another_round_is_refused() {
    use livemig::wire::protocol::{read_bulk, read_frame, Frame, Hello, PageRun, RoundEnd};
    let addr = fake_receiver(|mut s| {
        let Ok(h) = protocol::read_handshake::<Hello>(&mut s) else {
            return;
        };
        let limits = h.limits().unwrap();
        let _ = protocol::write_message(&mut s, &Message::hello_ack());
        let mut page = vec![0u8; h.page_size as usize];
        loop {
            match read_frame(&mut s, Some(&limits)) {
                Ok(Frame::Run(PageRun::Pages { count, .. })) => {
                    for _ in 0..count {
                        if read_bulk(&mut s, &mut page, Kind::Pages).is_err() {
                            return;
                        }
                    }
                }
                Ok(Frame::Message(Message::RoundEnd(RoundEnd { round, .. }))) => {
                    let _ = protocol::write_message(&mut s, &Message::round_ack(round + 5));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let r = send_to(&addr, &[]);
    r.assert_fails_with(&[
        "round 0",
        "acknowledges RoundAck { round: 5 }",
        "source guest was resumed",
    ]);
    assert_source_resumed_and_reaped(&r);
}

/// A round whose `RoundEnd` counts more pages than arrived, on the one
/// connection, on a data connection, and summed over the data connections.
#[test]
fn receiver_refuses_a_round_whose_page_count_does_not_match() {
    let run = |pages: u32| {
        let mut b = protocol::pages_frame_header(0, pages, 4096).to_vec();
        b.extend(vec![7u8; pages as usize * 4096]);
        b
    };
    let mut bytes = hello(protocol::VERSION, 1 << 20);
    bytes.extend(Message::round_start(0, false).encode());
    bytes.extend(run(4));
    bytes.extend(Message::round_end(0, 5).encode());
    receiver_fed(&bytes).assert_fails_with(&["round 0", "sent 5 pages, 4 arrived"]);

    // One data connection's share of the round is short.
    let (child, addr) = receiver(&[], &[]);
    let (mut ctl, mut data) = fake_sender(&addr, 2);
    protocol::write_message(&mut ctl, &Message::round_start(0, false)).unwrap();
    data[0].write_all(&run(4)).unwrap();
    protocol::write_message(&mut data[0], &Message::round_end(0, 5)).unwrap();
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&["data connection 0", "round 0", "sent 5 pages, 4 arrived"]);
    drop((ctl, data));

    // Each data connection agrees with itself, the round's total does not.
    let (child, addr) = receiver(&[], &[]);
    let (mut ctl, mut data) = fake_sender(&addr, 2);
    protocol::write_message(&mut ctl, &Message::round_start(0, false)).unwrap();
    data[0].write_all(&run(4)).unwrap();
    for (d, pages) in data.iter_mut().zip([4, 0]) {
        protocol::write_message(d, &Message::round_end(0, pages)).unwrap();
    }
    protocol::write_message(&mut ctl, &Message::round_end(0, 9)).unwrap();
    let output = child.wait_with_output().unwrap();
    let r = Run {
        output,
        report: None,
    };
    r.assert_fails_with(&["round 0", "sent 9 pages, 4 arrived"]);
}
