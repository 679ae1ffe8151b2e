//! A peer that speaks the protocol but misbehaves, both ways: real
//! recorded sessions replayed with a frame cut off, two frames swapped, a
//! frame duplicated or a header corrupted (seeded, at random frame
//! boundaries). A fake sender replays the sender's side against `livemig
//! receive`; a fake receiver answers `livemig send` with the receiver's
//! recorded replies. Every case must end with one clean error line, a
//! `failed` JSON report, exit status 1, no process left behind, and on the
//! send side the source guest resumed unless the destination's had started.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;

use livemig::wire::protocol::{self, Frame, Hello, Message, PageRun, RoundStart};

/// Cases per direction, and the seed they are drawn from.
const CASES: u64 = 24;
const SEED: u64 = 0x011f_e316;

/// The guest every recorded session migrates (also what the fake
/// receiver's live senders run: their rounds must match the recording).
const SEND_ARGS: &[&str] = &[
    "--mem", "2M", "--warmup", "50ms", "--policy", "fixed:3", "--seed", "5",
];

/// A session with pages of every form, recorded once per test binary.
fn rich_session() -> &'static Recorded {
    static S: OnceLock<Recorded> = OnceLock::new();
    S.get_or_init(|| {
        let mut args = SEND_ARGS.to_vec();
        args.extend(["--workload", "hotset:wws=256K,rate=20k,zero=0.3,random=0.2"]);
        args.extend(["--compress", "lz4", "--xbzrle", "1M"]);
        record(&args)
    })
}

/// A session of an idle guest: the same replies whatever a live sender's
/// guest writes meanwhile.
fn idle_session() -> &'static Recorded {
    static S: OnceLock<Recorded> = OnceLock::new();
    S.get_or_init(|| {
        let mut args = SEND_ARGS.to_vec();
        args.extend(["--workload", "idle"]);
        record(&args)
    })
}

/// A tag in the environment of a `livemig` under test, which its guest
/// processes inherit: none may carry it once the case is over.
fn tag(case: &str) -> String {
    format!("LIVEMIG_MISBEHAVE={}-{case}", std::process::id())
}

fn assert_no_process_tagged(tag: &str) {
    let tagged = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read(p.path().join("environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == tag.as_bytes()))
        })
    };
    // The guest is killed as its owner exits: wait for it to be gone.
    wait_until(&format!("the processes tagged {tag} to end"), || {
        (!tagged()).then_some(())
    });
}

/// How a case ended, checked: one clean error line (no panic, not a
/// timeout), exit status 1, a `failed` report naming the error.
fn assert_failed_cleanly(r: &Run, what: &str) {
    assert!(
        r.output.status.code() == Some(1),
        "{what}: exit {:?}\n{}",
        r.output.status,
        r.stderr()
    );
    r.assert_fails_with(&[]);
    let line = r.stderr();
    assert!(!line.contains("for 30 s"), "{what}: a timeout: {line}");
    eprint!("{what}\n  {line}");
    let rep = r.report();
    assert_eq!(rep["status"], "failed", "{what}: {rep:#}");
    assert!(
        rep["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {rep:#}"
    );
}

/// Write `bytes` to a fresh `livemig receive` as its sender, then close.
fn fake_sender_replays(bytes: &[u8], tag: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rx.json");
    let (k, v) = tag.split_once('=').unwrap();
    let (child, addr) = receiver(&["--json".as_ref(), json.as_os_str()], &[(k, v)]);
    let mut s = TcpStream::connect(&addr).unwrap();
    // The receiver may refuse early and stop reading: that is its right.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.read_to_end(&mut Vec::new());
    let output = child.wait_with_output().unwrap();
    let report = std::fs::read(&json)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    Run { output, report }
}

#[test]
fn a_fake_sender_replaying_a_spoiled_session_fails_the_receiver_cleanly() {
    let frames = frames(&rich_session().sent);
    // The replay is faithful: unspoiled, the session verifies.
    let r = fake_sender_replays(&rich_session().sent, &tag("rx-faithful"));
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(r.report()["status"], "completed");
    for case in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(SEED + case);
        let m = Mutation::draw(&mut rng, &frames);
        let tag = tag(&format!("rx{case}"));
        let r = fake_sender_replays(&m.apply(&frames).concat(), &tag);
        assert_failed_cleanly(&r, &format!("case {case}: {m:?}"));
        assert_no_process_tagged(&tag);
    }
}

/// Answer one `livemig send` with `replies`, one frame each time the real
/// receiver answered (the Hello, a pre-copy round's end, the device
/// state, the digests' end); after the last, or a corrupted one, close.
fn fake_receiver_replays(replies: Vec<Vec<u8>>, corrupt: Option<usize>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut next = 0;
        // One reply; false once the script has ended.
        let mut answer = |s: &mut TcpStream| {
            let done = match replies.get(next) {
                Some(f) => s.write_all(f).is_err() || next + 1 == replies.len(),
                None => true,
            };
            let corrupted = corrupt == Some(next);
            next += 1;
            !(done || corrupted)
        };
        let Ok(hello) = protocol::read_handshake::<Hello>(&mut s) else {
            return;
        };
        let limits = hello.limits().unwrap();
        let mut go = answer(&mut s);
        let mut stop_and_copy = false;
        let mut sink = vec![0u8; limits.page_size as usize * 1024 + 1024];
        while go {
            let frame = match protocol::read_frame(&mut s, Some(&limits)) {
                Ok(f) => f,
                Err(_) => return,
            };
            let bulk = match frame {
                Frame::Run(PageRun::Pages { count, .. }) => {
                    count as usize * limits.page_size as usize
                }
                Frame::Run(
                    PageRun::CompressedPages { len, .. } | PageRun::XbzrlePages { len, .. },
                ) => len as usize,
                Frame::Digests { count, .. } => count as usize * 8,
                _ => 0,
            };
            if s.read_exact(&mut sink[..bulk]).is_err() {
                return;
            }
            go = match frame {
                Frame::Message(Message::RoundStart(RoundStart {
                    stop_and_copy: sc, ..
                })) => {
                    stop_and_copy = sc;
                    true
                }
                Frame::Message(Message::RoundEnd(_)) if !stop_and_copy => answer(&mut s),
                Frame::Message(Message::DeviceState(_) | Message::Complete(_)) => answer(&mut s),
                _ => true,
            };
        }
        // Closing with the sender's bytes unread would reset the
        // connection, and could discard what it has not read yet.
        let _ = s.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    addr
}

/// Run `livemig send` against `addr` on the recorded guest.
fn send_to(addr: &str, tag: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tx.json");
    let (k, v) = tag.split_once('=').unwrap();
    let output = livemig()
        .args(["send", "--to", addr, "--quiet", "--workload", "idle"])
        .args(SEND_ARGS)
        .arg("--json")
        .arg(&json)
        .env(k, v)
        .output()
        .unwrap();
    let report = std::fs::read(&json)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    Run { output, report }
}

#[test]
fn a_fake_receiver_replaying_spoiled_replies_fails_the_sender_cleanly() {
    let replies = frames(&idle_session().replies);
    let resumed = replies
        .iter()
        .position(|f| u16::from_le_bytes([f[0], f[1]]) == protocol::Kind::Resumed as u16)
        .expect("the recording has its Resumed");
    let r = send_to(
        &fake_receiver_replays(replies.clone(), None),
        &tag("tx-faithful"),
    );
    assert_verified(&r);
    for case in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(SEED + case);
        let m = Mutation::draw(&mut rng, &replies);
        let (first_spoiled, corrupt) = match m {
            Mutation::Cut { keep } => (keep, None),
            Mutation::Swap { at } => (at, None),
            Mutation::Duplicate { at } => (at + 1, None),
            Mutation::Corrupt { at, .. } => (at, Some(at)),
        };
        let tag = tag(&format!("tx{case}"));
        let r = send_to(&fake_receiver_replays(m.apply(&replies), corrupt), &tag);
        let what = format!("case {case}: {m:?}");
        assert_failed_cleanly(&r, &what);
        let rep = r.report();
        // Until the destination says its guest runs, the source's runs on.
        let kept = first_spoiled <= resumed;
        assert_eq!(rep["source_guest_kept_running"], kept, "{what}: {rep:#}");
        assert_gone(&rep["source_guest_pid"]);
        assert_no_process_tagged(&tag);
    }
}

/// Write the fuzz targets' seeds (see `fuzz/`) from sessions recorded
/// now, into `$LIVEMIG_SEEDS` (default `fuzz/seeds`): `scripts/fuzz.sh`
/// runs it so the seeds always speak this build's protocol.
#[test]
#[ignore = "writes fuzz seeds; scripts/fuzz.sh runs it"]
fn record_fuzz_seeds() {
    let root = std::env::var_os("LIVEMIG_SEEDS").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds"),
        Into::into,
    );
    let (session_dir, frame_dir) = (root.join("session"), root.join("frame"));
    std::fs::create_dir_all(&session_dir).unwrap();
    std::fs::create_dir_all(&frame_dir).unwrap();
    // 1 MiB guests, as the session target expects; the content keeps most
    // pages zero or compressible so that the seeds stay small.
    let base = [
        "--mem",
        "1M",
        "--warmup",
        "50ms",
        "--policy",
        "fixed:2",
        "--workload",
        "hotset:wws=16K,rate=2k,hot=1,zero=1,random=0",
    ];
    let flavours: [(&str, &[&str]); 3] = [
        ("raw", &[]),
        ("lz4-xbzrle", &["--compress", "lz4", "--xbzrle", "256K"]),
        ("zstd", &["--compress", "zstd", "--no-zero-pages"]),
    ];
    let mut kinds_seen = std::collections::HashSet::new();
    for (name, extra) in flavours {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let rec = record(&args);
        std::fs::write(session_dir.join(format!("{name}.bin")), &rec.sent).unwrap();
        let sent = frames(&rec.sent);
        // The frame target: the first frames of the session as one stream
        // (first byte 5: a handshake, then frames within 1 MiB of 4 KiB
        // pages), and one frame of each kind alone (first byte 1); small
        // ones, so that the fuzzer runs fast.
        let mut stream = vec![5u8];
        for f in sent.iter().take_while(|f| f.len() <= 16 << 10).take(24) {
            stream.extend(f);
        }
        std::fs::write(frame_dir.join(format!("{name}-stream.bin")), stream).unwrap();
        for f in sent.iter().chain(&frames(&rec.replies)) {
            let kind = u16::from_le_bytes([f[0], f[1]]);
            if f.len() <= 64 << 10 && kinds_seen.insert(kind) {
                let seed = [&[1u8][..], f].concat();
                std::fs::write(frame_dir.join(format!("kind{kind}.bin")), seed).unwrap();
            }
        }
        if name == "raw" {
            // A post-copy switch-over (this recorder takes one connection
            // only, so it is made from the pre-copy one): the Hello with
            // its POSTCOPY flag, pages to fetch, the device state.
            let mut hello = sent[0].clone();
            hello[8 + 28] |= protocol::HELLO_POSTCOPY as u8;
            let state = sent
                .iter()
                .find(|f| u16::from_le_bytes([f[0], f[1]]) == protocol::Kind::DeviceState as u16)
                .unwrap();
            let mut post = hello;
            post.extend(protocol::discard_frame_header(0, 16));
            post.extend(protocol::discard_frame_header(100, 156));
            post.extend(state);
            std::fs::write(session_dir.join("postcopy.bin"), post).unwrap();
        }
    }
}
