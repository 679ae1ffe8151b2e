use std::net::TcpListener;
use std::path::Path;

use super::certs::{generate, Validity};
use super::*;
use crate::wire::protocol::{self, Message, CONTROL_STREAM};

/// A connected pair of sockets over loopback: (client, server).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for sock in [&c, &s] {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    (c, s)
}

fn tls(dir: &Path, host: &str, allow: &[&str]) -> Security {
    Security::tls(&TlsFiles {
        cert: dir.join(format!("{host}.crt")),
        key: dir.join(format!("{host}.key")),
        ca: dir.join("ca.crt"),
        allow: allow.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap()
}

fn psk(dir: &Path, name: &str, key: &[u8]) -> Security {
    let path = dir.join(name);
    std::fs::write(&path, key).unwrap();
    Security::psk(&path).unwrap()
}

/// Open both ends at once: (client's result, server's result).
type Opened = (
    Result<Conn, TransportError>,
    Result<(Conn, Option<(u32, u64)>), TransportError>,
);

fn open(client: &Security, server: &Security, conn: u32, session: u64) -> Opened {
    let (c, s) = pair();
    std::thread::scope(|scope| {
        let srv = scope.spawn(|| server.server(s));
        let cl = client.client(c, "127.0.0.1:1", conn, session);
        // A refused client closes; the server's drain then ends.
        (cl, srv.join().unwrap())
    })
}

#[test]
fn tls_carries_vectored_writes_and_reads_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = [("a".to_string(), Validity::Days(1))];
    generate(dir.path(), &hosts).unwrap();
    let sec = tls(dir.path(), "a", &["a"]);
    let (c, s) = open(&sec, &sec, CONTROL_STREAM, 7);
    let (mut c, (mut s, claim)) = (c.unwrap(), s.unwrap());
    assert_eq!(claim, None);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|scope| {
        let mut w = c.try_clone().unwrap();
        let big = &big;
        scope.spawn(move || {
            let mut bufs = [IoSlice::new(&big[..10]), IoSlice::new(&big[10..])];
            crate::util::netio::write_all_vectored(&mut w, &mut bufs).unwrap();
        });
        let mut got = vec![0u8; big.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == *big, "the bytes arrive as written");
    });
    assert!(!s.ready().unwrap(), "nothing more to read");
    s.write_all(b"back").unwrap();
    assert!(c.wait_readable(Duration::from_secs(10)).unwrap());
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"back");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0, "a clean end after close_notify");
}

#[test]
fn tls_refuses_another_ca_an_expired_certificate_and_a_name_not_allowed() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hosts = [
        ("a".to_string(), Validity::Days(1)),
        ("old".to_string(), Validity::Expired),
    ];
    generate(one.path(), &hosts).unwrap();
    generate(two.path(), &hosts[..1]).unwrap();
    let (a, foreign) = (tls(one.path(), "a", &[]), tls(two.path(), "a", &[]));
    let (c, s) = open(&foreign, &a, CONTROL_STREAM, 1);
    let c = c
        .err()
        .expect("the client refuses a receiver of another CA");
    assert!(
        c.to_string().contains("not signed by this end's --tls-ca"),
        "{c}"
    );
    assert!(s.is_err());
    let old = tls(one.path(), "old", &[]);
    let (c, s) = open(&a, &old, CONTROL_STREAM, 1);
    let c = c.err().expect("an expired receiver certificate is refused");
    assert!(c.to_string().contains("has expired"), "{c}");
    assert!(s.is_err());
    let picky = tls(one.path(), "a", &["b"]);
    let (_, s) = open(&a, &picky, CONTROL_STREAM, 1);
    let s = s
        .err()
        .expect("a sender not named by --tls-allow is refused");
    assert_eq!(
        s.to_string(),
        "the sender's certificate names none of --tls-allow b"
    );
}

#[test]
fn psk_binds_the_session_and_connection_and_refuses_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = psk(dir.path(), "k", b"0123456789abcdef0123\n");
    let (c, s) = open(&key, &key, 3, 0xfeed);
    c.unwrap();
    assert_eq!(s.unwrap().1, Some((3, 0xfeed)));
    let other = psk(dir.path(), "o", b"another key of enough length");
    let (c, s) = open(&other, &key, 3, 0xfeed);
    let (c, s) = (c.err().unwrap(), s.err().unwrap());
    assert!(c.to_string().contains("different key"), "{c}");
    assert!(s.to_string().contains("--psk keys differ"), "{s}");
}

/// Act as a sender by hand on a fresh connection to a receiver holding
/// `key`: send AuthHello{conn, session, nonce}, then the proof `prove`
/// makes from the receiver's nonce. Returns the receiver's verdict and
/// the proof sent.
fn by_hand(
    key: &Security,
    (conn, session): (u32, u64),
    prove: impl FnOnce(&[u8; protocol::AUTH_LEN]) -> [u8; protocol::AUTH_LEN],
) -> (Result<(u32, u64), TransportError>, [u8; protocol::AUTH_LEN]) {
    let Security::Psk(k) = key else {
        panic!("a PSK")
    };
    let (mut c, s) = pair();
    std::thread::scope(|scope| {
        let srv = scope.spawn(|| k.server(&s));
        let nonce = [7; protocol::AUTH_LEN];
        let hello = protocol::AuthHello {
            version: protocol::VERSION,
            conn,
            session,
            nonce,
        };
        protocol::write_message(&mut c, &Message::AuthHello(hello)).unwrap();
        let ch: protocol::AuthChallenge = protocol::expect_message(&mut c, None).unwrap();
        let mac = prove(&ch.nonce);
        protocol::write_message(&mut c, &Message::AuthProof(protocol::AuthProof { mac })).unwrap();
        (srv.join().unwrap(), mac)
    })
}

#[test]
fn a_replayed_or_spliced_psk_proof_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = psk(dir.path(), "k", b"0123456789abcdef");
    let Security::Psk(k) = &key else {
        panic!("a PSK")
    };
    let honest = |conn, session| {
        move |theirs: &[u8; protocol::AUTH_LEN]| {
            k.tag(b"sender", conn, session, (&[7; protocol::AUTH_LEN], theirs))
        }
    };
    let (ok, recorded) = by_hand(&key, (2, 5), honest(2, 5));
    assert_eq!(ok.unwrap(), (2, 5));
    // The same opening and proof again: the receiver's nonce is new.
    let (replayed, _) = by_hand(&key, (2, 5), |_| recorded);
    let e = replayed.expect_err("a replayed proof fails");
    assert!(matches!(e, TransportError::WrongKey(Peer::Sender)), "{e}");
    // A proof made for data connection 2 cannot open connection 3, nor
    // connection 2 of another session.
    for claim in [(3, 5), (2, 6)] {
        let (spliced, _) = by_hand(&key, claim, honest(2, 5));
        assert!(spliced.is_err(), "{claim:?} refused");
    }
}

#[test]
fn plain_ends_off_loopback_need_insecure() {
    let plain = Security::Plain;
    plain
        .check_exposure("listen on", "127.0.0.1:0", false)
        .unwrap();
    plain
        .check_exposure("send to", "[::1]:4444", false)
        .unwrap();
    let e = plain.check_exposure("listen on", "0.0.0.0:4444", false);
    let e = e.unwrap_err().to_string();
    assert!(e.starts_with("refusing to listen on 0.0.0.0:4444 without authentication"));
    assert!(e.contains("--tls-ca, --tls-cert and --tls-key, or --psk FILE"));
    plain
        .check_exposure("send to", "10.1.2.3:4444", true)
        .unwrap();
}

#[test]
fn a_short_psk_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    std::fs::write(&path, b"short\n").unwrap();
    let e = Security::psk(&path).err().unwrap().to_string();
    assert!(e.contains("the key has 5 bytes; use at least 16"), "{e}");
}
