//! Helpers shared by the integration tests: run the real binary, read its
//! JSON report.
#![allow(dead_code)]

pub mod testbed;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use livemig::guest::dirty::TrackerKind;
use livemig::wire::protocol::{self, Message};

pub fn livemig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livemig"))
}

pub struct Run {
    pub output: Output,
    pub report: Option<serde_json::Value>,
}

impl Run {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn ok(&self) -> bool {
        self.output.status.success()
    }

    pub fn report(&self) -> &serde_json::Value {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("no report; stderr: {}", self.stderr()))
    }

    /// Assert a failure with exactly one error line on stderr containing every needle.
    pub fn assert_fails_with(&self, needles: &[&str]) {
        assert!(!self.ok(), "expected failure, stdout: {}", self.stdout());
        assert_eq!(
            self.output.status.code(),
            Some(1),
            "stderr: {}",
            self.stderr()
        );
        let err = self.stderr();
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("Error:")).collect();
        assert_eq!(lines.len(), 1, "one error line expected: {err}");
        for n in needles {
            assert!(
                lines[0].to_lowercase().contains(&n.to_lowercase()),
                "{n:?} not in {:?}",
                lines[0]
            );
        }
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Run `livemig ARGS --json tmp` and load the report if one was written.
pub fn run(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json: PathBuf = dir.path().join("report.json");
    let output = livemig()
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let report = std::fs::read(&json)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    Run { output, report }
}

/// A real `livemig receive ARGS` (with `env` set) on an ephemeral port,
/// and that port; its stderr past the first line is left in the child.
pub fn receiver(args: &[&OsStr], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = livemig()
        .args(["receive", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (child, addr)
}

/// A local migration with small, fast defaults; `extra` overrides them.
pub fn migrate(extra: &[&str]) -> Run {
    let mut args = vec!["migrate", "--quiet", "--mem", "16M", "--warmup", "100ms"];
    args.extend_from_slice(extra);
    run(&args)
}

/// Assert the migration completed with every page verified.
pub fn assert_verified(r: &Run) -> &serde_json::Value {
    assert!(r.ok(), "migration failed: {}\n{}", r.stderr(), r.stdout());
    let rep = r.report();
    assert_eq!(rep["status"], "completed", "{rep:#}");
    let pages = rep["memory_bytes"].as_u64().unwrap() / rep["page_size"].as_u64().unwrap();
    assert_eq!(rep["verified_pages"].as_u64(), Some(pages), "{rep:#}");
    assert_eq!(rep["mismatched_pages"].as_u64(), Some(0), "{rep:#}");
    rep
}

/// The guest process is gone: not running, not stopped, not a zombie.
pub fn assert_gone(pid: &serde_json::Value) {
    let pid = pid.as_i64().expect("a pid");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "guest {pid} left behind"
    );
}

/// The trackers this kernel can run; the others are named with the reason.
/// From Linux 6.7 on `uffd-wp` must work: a failing probe there is a bug,
/// not a missing feature, and must not pass as a skip.
pub fn available_trackers() -> Vec<TrackerKind> {
    TrackerKind::ALL
        .into_iter()
        .filter(|k| match k.check_kernel() {
            Ok(()) => true,
            Err(e) if *k == TrackerKind::UffdWp && kernel_at_least(6, 7) => {
                panic!("uffd-wp fails on Linux 6.7+: {e}")
            }
            Err(e) => {
                // Not a test's skip (CI lacks soft-dirty too), but visible,
                // once per test binary.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    livemig::util::skip::note(format_args!("not testing {}: {e}", k.as_str()))
                });
                false
            }
        })
        .collect()
}

pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// The first child process of `pid` (of any of its threads), once one exists.
pub fn child_of(pid: u32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let kids = std::fs::read_to_string(t.path().join("children")).ok()?;
        kids.split_whitespace().next()?.parse().ok()
    })
}

/// Wait until `ready` holds, polling; panic with `what` after a minute (a
/// bound on a hang, not on speed: every wait here takes well under a second).
pub fn wait_until<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(t) = ready() {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited a minute for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The rate limiter's promise for one round of a report: it never sends
/// more than its limit allows over the round's own duration, plus the
/// bucket's depth (10 ms of the limit, at least 64 KiB) and a page of
/// control frames. A bound on time from below: no machine is too slow for
/// it, where "within x % of the limit" fails on a busy one.
pub fn assert_paced(round: &serde_json::Value) {
    let f = |k: &str| {
        round[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {round}"))
    };
    let limit = f("rate_limit_bps") / 8.0;
    let (bytes, secs) = (f("bytes"), f("duration_ms") / 1e3);
    let allowed = limit * secs + (limit / 100.0).max(64.0 * 1024.0) + 4096.0;
    assert!(
        bytes <= allowed,
        "{bytes} bytes in {secs} s at {limit} bytes/s: more than {allowed}: {round}"
    );
}

/// A fake sender's handshake for `streams` connections over 1 MiB of
/// 4 KiB pages: the control connection, then the data connections.
pub fn fake_sender(addr: &str, streams: u32) -> (TcpStream, Vec<TcpStream>) {
    let session = 11;
    let mut ctl = TcpStream::connect(addr).unwrap();
    let hello = Message::hello(4096, 1 << 20, streams, session);
    protocol::write_message(&mut ctl, &hello).unwrap();
    protocol::read_handshake::<protocol::HelloAck>(&mut ctl).unwrap();
    let data = (0..streams)
        .filter(|_| streams > 1)
        .map(|index| {
            let mut s = TcpStream::connect(addr).unwrap();
            protocol::write_message(&mut s, &Message::stream_hello(index, session)).unwrap();
            s
        })
        .collect();
    (ctl, data)
}

/// A one-connection session as a real `send` and `receive` spoke it: the
/// bytes each way on the control connection.
pub struct Recorded {
    /// What the sender wrote.
    pub sent: Vec<u8>,
    /// What the receiver wrote back.
    pub replies: Vec<u8>,
}

/// Migrate with `livemig send ARGS` (one connection) to a real receiver
/// through a proxy that records both directions; the migration must
/// complete with every page verified.
pub fn record(send_args: &[&str]) -> Recorded {
    use std::io::{Read, Write};
    let (rx, addr) = receiver(&[], &[]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = l.local_addr().unwrap().to_string();
    let tee = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let (mut seen, mut buf) = (Vec::new(), vec![0u8; 64 << 10]);
            while let Ok(n @ 1..) = from.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
            seen
        })
    };
    let recorder = std::thread::spawn(move || {
        let (from, _) = l.accept().unwrap();
        let to = TcpStream::connect(&addr).unwrap();
        let up = tee(from.try_clone().unwrap(), to.try_clone().unwrap());
        let down = tee(to, from);
        (up.join().unwrap(), down.join().unwrap())
    });
    let mut args = vec!["send", "--to", &proxy, "--quiet"];
    args.extend_from_slice(send_args);
    let sent = run(&args);
    assert_verified(&sent);
    let out = rx.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, replies) = recorder.join().unwrap();
    Recorded { sent, replies }
}

/// Split a recorded byte stream into its frames (header and payload each).
pub fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= protocol::HEADER_LEN {
        let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let (frame, rest) = bytes.split_at(protocol::HEADER_LEN + len);
        out.push(frame.to_vec());
        bytes = rest;
    }
    assert!(bytes.is_empty(), "a recording ends inside a frame");
    out
}

/// What a misbehaving peer does to a recorded session, at a frame boundary.
#[derive(Clone, Copy, Debug)]
pub enum Mutation {
    /// Only the first `keep` frames, then close.
    Cut { keep: usize },
    /// Frames `at` and `at + 1` trade places.
    Swap { at: usize },
    /// Frame `at` twice.
    Duplicate { at: usize },
    /// Byte `byte` of frame `at`'s header XORed with `xor` (not 0).
    Corrupt { at: usize, byte: usize, xor: u8 },
}

/// Whether a frame carries pages (whose order within a round is free).
fn is_page_run(frame: &[u8]) -> bool {
    use livemig::wire::protocol::Kind;
    let kind = u16::from_le_bytes([frame[0], frame[1]]);
    [
        Kind::Pages,
        Kind::ZeroPages,
        Kind::CompressedPages,
        Kind::XbzrlePages,
    ]
    .iter()
    .any(|k| *k as u16 == kind)
}

impl Mutation {
    /// A mutation, drawn with `rng`, that no valid session survives: a cut
    /// drops at least the last frame, a duplicate is never of the last
    /// frame (a peer may ignore what follows the end), a swap moves a
    /// frame across a control frame (page runs of a round may come in any
    /// order) and a corruption changes a header.
    pub fn draw(rng: &mut fastrand::Rng, frames: &[Vec<u8>]) -> Mutation {
        let n = frames.len();
        loop {
            let m = match rng.u8(0..4) {
                0 => Mutation::Cut {
                    keep: rng.usize(0..n),
                },
                1 => Mutation::Swap {
                    at: rng.usize(0..n - 1),
                },
                2 => Mutation::Duplicate {
                    at: rng.usize(0..n - 1),
                },
                _ => Mutation::Corrupt {
                    at: rng.usize(0..n),
                    byte: rng.usize(0..protocol::HEADER_LEN),
                    xor: rng.u8(1..),
                },
            };
            match m {
                Mutation::Swap { at }
                    if (is_page_run(&frames[at]) && is_page_run(&frames[at + 1]))
                        || frames[at] == frames[at + 1] => {}
                m => return m,
            }
        }
    }

    /// `frames` with this mutation applied.
    pub fn apply(self, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut f = frames.to_vec();
        match self {
            Mutation::Cut { keep } => f.truncate(keep),
            Mutation::Swap { at } => f.swap(at, at + 1),
            Mutation::Duplicate { at } => f.insert(at, f[at].clone()),
            Mutation::Corrupt { at, byte, xor } => f[at][byte] ^= xor,
        }
        f
    }
}
