//! Round trips, and every rejection naming what it rejects.

use super::*;
use crate::wire::reduce::Codec;
use ProtocolError as E;

const L: Limits = Limits {
    streams: 1,
    page_size: 4096,
    page_count: 65536,
};
const LIM: Option<&Limits> = Some(&L);

fn read(bytes: &[u8], limits: Option<&Limits>) -> Result<Frame, ProtocolError> {
    read_frame(&mut &bytes[..], limits)
}

fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    [
        &kind.to_le_bytes()[..],
        &flags.to_le_bytes(),
        &len.to_le_bytes(),
        payload,
    ]
    .concat()
}

/// A Pages (kind 4) or Digests (kind 8) frame: run header + `extra` zero bytes.
fn run(kind: u16, first: u64, count: u32, reserved: u32, extra: usize) -> Vec<u8> {
    let head = [
        &first.to_le_bytes()[..],
        &count.to_le_bytes(),
        &reserved.to_le_bytes(),
    ];
    let mut v = head.concat();
    v.resize(16 + extra, 0);
    frame(kind, 0, &v)
}

/// `result => Variant pattern, "text the message must contain";` per line.
macro_rules! rejects {
    ($($result:expr => $pat:pat, $text:expr;)+) => {$({
        let e = $result.expect_err("should be rejected");
        assert!(matches!(e, $pat), "wrong variant: {e:?}");
        assert!(e.to_string().contains($text), "{e} does not contain {:?}", $text);
    })+};
}

#[test]
fn abort_reasons_cannot_drive_a_terminal() {
    let m = Message::abort("disk full\nError: lies\x1b[31m");
    let Frame::Message(Message::Abort(Abort(r))) = read(&m.encode(), None).unwrap() else {
        panic!()
    };
    assert_eq!(r, "disk full\\nError: lies\\u{1b}[31m");
}

#[test]
fn messages_round_trip() {
    let all = [
        Message::hello(4096, 1 << 30, 4, 0x0123_4567_89ab_cdef),
        Message::hello_ack(),
        Message::stream_hello(3, 0x0123_4567_89ab_cdef),
        Message::Hello(Hello {
            postcopy: true,
            ..Hello {
                version: VERSION,
                page_size: 4096,
                memory_bytes: 8192,
                streams: 1,
                session: 9,
                postcopy: false,
            }
        }),
        Message::page_request(65535, 1, 0),
        Message::page_request(100, 31, 15),
        Message::round_start(0, false),
        Message::round_start(7, true),
        Message::round_end(3, 12345),
        Message::round_ack(3),
        Message::device_state(vec![1, 2, 3]),
        Message::resumed(1_500_000, 262_144),
        Message::complete(),
        Message::verdict(65536, 0, None),
        Message::verdict(65530, 6, Some(17)),
        Message::abort("guest died: ünïcode"),
        Message::abort(""),
    ];
    for m in all {
        let mut buf = Vec::new();
        write_message(&mut buf, &m).unwrap();
        assert_eq!(read(&buf, None).unwrap(), Frame::Message(m.clone()));
        assert_eq!(read(&buf, LIM).unwrap(), Frame::Message(m));
    }
    let long = Message::abort("é".repeat(3000)).encode();
    let Frame::Message(Message::Abort(Abort(r))) = read(&long, None).unwrap() else {
        panic!()
    };
    assert_eq!(r.len(), MAX_ABORT_REASON);
}

#[test]
fn run_headers_round_trip() {
    let v = [&pages_frame_header(100, 2, 4096)[..], &[7u8; 8192]].concat();
    let mut r = &v[..];
    let f = read_frame(&mut r, LIM).unwrap();
    assert_eq!(
        f,
        Frame::Run(PageRun::Pages {
            first_page: 100,
            count: 2
        })
    );
    let mut pages = vec![0u8; 8192];
    read_bulk(&mut r, &mut pages, Kind::Pages).unwrap();
    assert!(pages.iter().all(|&b| b == 7) && r.is_empty());

    let d = [1u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat();
    let v = [&digests_frame_header(65534, 2)[..], &d].concat();
    let mut r = &v[..];
    let f = read_frame(&mut r, LIM).unwrap();
    assert_eq!(
        f,
        Frame::Digests {
            first_page: 65534,
            count: 2
        }
    );
    assert_eq!(read_digests(&mut r, 2).unwrap(), vec![1, u64::MAX]);
}

#[test]
fn kinds_and_headers_round_trip() {
    for v in 1..=18u16 {
        let kind = Kind::try_from(v).unwrap();
        assert_eq!(kind as u16, v);
        let flags = if kind == Kind::RoundStart {
            FLAG_STOP_AND_COPY
        } else {
            0
        };
        let h = Header {
            kind,
            flags,
            len: 0x0102_0304,
        };
        let b = h.encode();
        assert_eq!(&b[4..], &[4, 3, 2, 1], "little-endian length");
        assert_eq!(Header::decode(b).unwrap(), h);
    }
}

#[test]
fn header_rejections() {
    rejects! {
        read(&frame(0, 0, &[]), LIM) => E::InvalidKind, "frame kind 0 is reserved";
        read(&frame(99, 0, &[]), LIM) => E::UnknownKind(99), "unknown frame kind 99";
        read(&frame(9, 2, &[]), LIM) => E::BadFlags { .. },
            "Complete: unknown flag bits 0x0002";
        read(&frame(3, 2, &[0; 8]), LIM) => E::BadFlags { .. }, "RoundStart: unknown flag bits";
    }
    let mut flagged = run(4, 0, 1, 0, 4096);
    flagged[2] = 1;
    rejects! { read(&flagged, LIM) => E::BadFlags { .. }, "Pages: unknown flag bits 0x0001"; }
}

#[test]
fn handshake_rejections() {
    let mut bad = Message::hello(4096, 1 << 20, 1, 0).encode();
    bad[8] = b'X';
    let v7 = Message::Hello(Hello {
        version: 7,
        page_size: 4096,
        memory_bytes: 4096,
        streams: 1,
        session: 0,
        postcopy: false,
    })
    .encode();
    // A longer (future) Hello still reports the version, not the length.
    let mut v3 = [&MAGIC[..], &(VERSION + 1).to_le_bytes(), &[0; 40]].concat();
    let v3_frame = frame(1, 0, &v3);
    v3[8] = VERSION as u8;
    let mut reserved_hello = Message::hello(4096, 8192, 1, 0).encode();
    reserved_hello[8 + 28] = 2; // flag bits other than POSTCOPY
    let mut ack = Message::hello_ack().encode();
    ack[20] = 1;
    let garbage = b"HTTP/1.1 400 Bad Request\r\n";
    let hello = Message::hello(4096, 8192, 1, 0).encode();
    let abort = Message::abort("no room").encode();
    let end = Message::round_end(0, 0).encode();
    // A TLS ClientHello's record header, and a PSK sender's opening.
    let client_hello = [0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00];
    let auth = Message::AuthHello(AuthHello {
        version: VERSION,
        conn: CONTROL_STREAM,
        session: 1,
        nonce: [0; AUTH_LEN],
    })
    .encode();
    rejects! {
        read_handshake::<Hello>(&mut &client_hello[..]) => E::TlsPeer, "the sender speaks TLS";
        read_handshake::<Hello>(&mut &auth[..]) => E::PskPeer,
            "the sender authenticates with a pre-shared key and this receiver has none";
        read_handshake::<AuthHello>(&mut &hello[..]) => E::NoPsk,
            "the sender did not authenticate, and this receiver requires a pre-shared key";
        read(&bad, None) => E::NotLivemig { .. }, "not a livemig peer (bad magic 0x58";
        read(&v7, None) => E::Version { peer: 7 },
            "peer speaks protocol version 7, this build speaks 4";
        read(&v3_frame, None) => E::Version { peer: 5 }, "version 5";
        read(&frame(1, 0, &v3), None) => E::BadLength { .. },
            "Hello: payload of 52 bytes, expected 40";
        read(&reserved_hello, None) => E::Reserved { value: 2, .. },
            "Hello: reserved field is 0x2";
        read(&frame(2, 0, &MAGIC), None) => E::BadLength { .. }, "HelloAck: payload of 8 bytes";
        read(&ack, None) => E::Reserved { value: 1, .. }, "HelloAck: reserved field is 0x1";
        read_handshake::<HelloAck>(&mut &garbage[..]) => E::NotLivemig { .. },
            "not a livemig peer (bad magic 0x485454502f312e31 \"HTTP/1.1\")";
        read_handshake::<HelloAck>(&mut &hello[..]) => E::Unexpected { .. },
            "unexpected frame Hello (expected HelloAck)";
        read_handshake::<HelloAck>(&mut &abort[..]) => E::Aborted(_),
            "peer aborted: no room";
        read_handshake::<Hello>(&mut &end[..]) => E::Unexpected { .. },
            "unexpected frame RoundEnd (expected Hello)";
        read_handshake::<Hello>(&mut &[][..]) => E::Closed, "connection closed by peer";
    }
    let h: Hello = read_handshake(&mut &hello[..]).unwrap();
    let l = h.limits().unwrap();
    assert_eq!((l.page_size, l.page_count), (4096, 2));
}

#[test]
fn hello_limits() {
    let h = |page_size, memory_bytes| Hello {
        version: VERSION,
        page_size,
        memory_bytes,
        streams: 1,
        session: 0,
        postcopy: false,
    };
    rejects! {
        h(1000, 4000).limits() => E::BadHello(_), "page size 1000 is not a power of two";
        h(2048, 4096).limits() => E::BadHello(_), "page size 2048";
        h(1 << 17, 1 << 17).limits() => E::BadHello(_), "page size 131072";
        h(4096, 0).limits() => E::BadHello(_), "memory size 0 bytes";
        h(4096, 5000).limits() => E::BadHello(_), "memory size 5000 bytes";
        Hello { version: 7, ..h(4096, 4096) }.limits() => E::Version { peer: 7 }, "version 7";
        Hello { streams: 0, ..h(4096, 4096) }.limits() => E::BadHello(_), "0 streams";
        Hello { streams: 65, ..h(4096, 4096) }.limits() => E::BadHello(_),
            "65 streams, outside 1..=64";
    }
}

#[test]
fn control_rejections() {
    let mut big = frame(6, 0, &[]);
    big[4..8].copy_from_slice(&5_000_000u32.to_le_bytes());
    let mut rs = Message::round_start(1, false).encode();
    rs[12] = 1;
    let huge = Message::device_state(vec![0; MAX_CONTROL_PAYLOAD + 1]);
    rejects! {
        read(&frame(3, 0, &[0; 9]), LIM) => E::BadLength { .. },
            "RoundStart: payload of 9 bytes, expected 8";
        read(&frame(9, 0, &[0]), LIM) => E::BadLength { .. },
            "Complete: payload of 1 bytes, expected 0";
        read(&big, LIM) => E::TooLarge { .. },
            "frame DeviceState: payload of 5000000 bytes exceeds the cap of 1048576";
        read(&frame(6, 0, &[]), LIM) => E::BadLength { .. }, "DeviceState: payload of 0 bytes";
        read(&frame(11, 0, &[b'a'; 4097]), LIM) => E::TooLarge { .. }, "Abort: payload of 4097";
        read(&rs, LIM) => E::Reserved { value: 1, .. }, "RoundStart: reserved field is 0x1";
        read(&Message::verdict(1, 1, Some(70000)).encode(), LIM) => E::BadField { .. },
            "first mismatch 70000";
        read(&Message::verdict(4096, 0, Some(5)).encode(), LIM) => E::BadField { .. },
            "0 mismatched pages but a first mismatch";
        read(&Message::verdict(4095, 1, None).encode(), LIM) => E::BadField { .. },
            "1 mismatched pages but no first mismatch";
        read(&Message::verdict(u64::MAX - 1, 5, None).encode(), LIM) => E::BadField { .. },
            "5 mismatched";
        write_message(&mut Vec::new(), &huge) => E::TooLarge { .. }, "1048577 bytes";
    }
}

#[test]
fn run_rejections() {
    rejects! {
        read(&run(4, 0, 0, 0, 0), LIM) => E::BadCount { count: 0, .. },
            "Pages: count 0 outside 1..=1024";
        read(&run(4, 0, 1025, 0, 0), LIM) => E::BadCount { count: 1025, .. }, "count 1025";
        read(&run(4, 65530, 10, 0, 0), LIM) => E::OutOfRange { .. },
            "frame Pages: page run 65530+10 out of range (memory has 65536 pages)";
        read(&run(4, u64::MAX - 1, 4, 0, 0), LIM) => E::OutOfRange { .. },
            "page run 18446744073709551614+4 out of range";
        read(&run(4, 0, 1, 0, 4095), LIM) => E::BadLength { .. },
            "Pages: payload of 4111 bytes, expected 16 + 1*4096 = 4112";
        read(&run(4, 0, 1, 5, 4096), LIM) => E::Reserved { value: 5, .. },
            "reserved field is 0x5";
        read(&frame(4, 0, &[0; 8]), LIM) => E::BadLength { .. }, "Pages: payload of 8 bytes";
        read(&run(8, 0, 2, 0, 24), LIM) => E::BadLength { .. }, "Digests: payload of 40 bytes";
        read(&run(8, 0, MAX_DIGESTS + 1, 0, 0), LIM) => E::BadCount { .. },
            "count 65537 outside";
        read(&run(8, 65535, 2, 0, 16), LIM) => E::OutOfRange { .. },
            "Digests: page run 65535+2";
        read(&run(4, 0, 1, 0, 4096), None) => E::Unexpected { .. }, "unexpected frame Pages";
        read(&run(8, 0, 1, 0, 8), None) => E::Unexpected { .. }, "unexpected frame Digests";
    }
}

#[test]
fn reduced_runs_round_trip_and_are_checked() {
    let frames = [
        (
            zero_frame_header(7, 60_000).to_vec(),
            Frame::Run(PageRun::ZeroPages {
                first_page: 7,
                count: 60_000,
            }),
        ),
        (
            [
                &compressed_frame_header(3, 4, Codec::Zstd, 100)[..],
                &[0; 100],
            ]
            .concat(),
            Frame::Run(PageRun::CompressedPages {
                first_page: 3,
                count: 4,
                codec: Codec::Zstd,
                len: 100,
            }),
        ),
        (
            [&xbzrle_frame_header(9, 2, 6)[..], &[0; 6]].concat(),
            Frame::Run(PageRun::XbzrlePages {
                first_page: 9,
                count: 2,
                len: 6,
            }),
        ),
    ];
    for (bytes, want) in frames {
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r, LIM).unwrap(), want);
    }
    let lz4 = Codec::Lz4.wire_id();
    rejects! {
        read(&run(14, 0, 1, 0, 1), LIM) => E::BadLength { .. },
            "ZeroPages: payload of 17 bytes, expected 16";
        read(&run(14, 65000, 537, 0, 0), LIM) => E::OutOfRange { .. }, "65000+537";
        read(&run(14, 0, 1, 2, 0), LIM) => E::Reserved { value: 2, .. }, "reserved";
        read(&run(15, 0, 1, 0, 10), LIM) => E::BadField { .. },
            "CompressedPages: unknown codec 0";
        read(&run(15, 0, 1, 9, 10), LIM) => E::BadField { .. }, "unknown codec 9";
        read(&run(15, 0, 1, lz4, 4096), LIM) => E::BadLength { .. },
            "CompressedPages: payload of 4112 bytes, expected 16 + 1..4096";
        read(&run(15, 0, 1, lz4, 0), LIM) => E::BadLength { .. }, "payload of 16 bytes";
        read(&run(15, 0, 1025, lz4, 10), LIM) => E::BadCount { .. }, "count 1025";
        read(&run(16, 0, 2, 0, 3), LIM) => E::BadLength { .. },
            "XbzrlePages: payload of 19 bytes, expected 16 + 4..=8194";
        read(&run(16, 0, 1, 0, 4098), LIM) => E::BadLength { .. }, "4114 bytes";
        read(&run(16, 0, 1, 0, 4), None) => E::Unexpected { .. },
            "unexpected frame XbzrlePages";
        read(&Message::page_request(0, 4, 4).encode(), LIM) => E::BadField { .. },
            "PageRequest: faulted page 4 outside the run of 4";
        read(&Message::page_request(65534, 4, 0).encode(), LIM) => E::OutOfRange { .. },
            "PageRequest: page run 65534+4";
        read(&Message::page_request(0, 1025, 0).encode(), LIM) => E::BadCount { .. },
            "count 1025";
    }
}

#[test]
fn truncation_and_close() {
    let hdr = pages_frame_header(0, 1, 4096);
    let end = Message::round_end(1, 2).encode();
    rejects! {
        read(&[], LIM) => E::Closed, "connection closed by peer";
        read(&[4, 0, 0], LIM) => E::Truncated { .. },
            "inside a frame header (needed 5 more bytes)";
        read(&hdr[..8], LIM) => E::Truncated { .. },
            "truncated stream: connection closed inside a Pages frame (needed 4112 more bytes)";
        read(&end[..12], LIM) => E::Truncated { .. }, "a RoundEnd frame (needed 12 more bytes)";
    }
    let mut r = &hdr[..];
    read_frame(&mut r, LIM).unwrap();
    let mut buf = vec![0u8; 4096];
    rejects! {
        read_bulk(&mut r, &mut buf, Kind::Pages) => E::Truncated { .. }, "needed 4096 more";
    }
    let two = [Message::complete().encode(), Message::complete().encode()].concat();
    let mut r = &two[..];
    expect_message::<Complete>(&mut r, LIM).unwrap();
    rejects! {
        expect_message::<Verdict>(&mut r, None) => E::Unexpected { .. },
            "unexpected frame Complete (expected Verdict)";
        read_frame(&mut r, LIM) => E::Closed, "closed";
    }
}

#[test]
fn teleport_frames_are_checked() {
    let lim = Limits {
        streams: 1,
        page_size: 4096,
        page_count: 100,
    };
    let entry = |first_page, first_block, count| MapEntry {
        first_page,
        first_block,
        count,
    };
    let map = |e: Vec<MapEntry>| Message::TeleportMap(TeleportMap(e)).encode();
    let ok = map(vec![entry(0, 7, 100)]);
    assert!(read_frame(&mut &ok[..], Some(&lim)).is_ok());
    let outside = map(vec![entry(0, 0, 1), entry(99, 0, 2)]);
    let empty_run = map(vec![entry(3, 0, 0)]);
    let overflow = map(vec![entry(3, u64::MAX, 2)]);
    let mut ragged = map(vec![entry(3, 0, 1), entry(5, 0, 1)]);
    ragged.pop();
    ragged[4] -= 1;
    let big_offer = Message::TeleportOffer(TeleportOffer {
        blocks: 101,
        block_size: 4096,
        samples: 64,
        digest: 0,
    })
    .encode();
    let mut bad_ack = Message::TeleportAck(TeleportAck {
        accepted: true,
        storage_rate: 1,
        reason: String::new(),
    })
    .encode();
    bad_ack[8] = 2;
    let done = Message::TeleportDone(TeleportDone {
        pages: 90,
        skipped: 11,
        bytes: 0,
        busy_ns: 0,
    })
    .encode();
    let l = Some(&lim);
    rejects! {
        read_frame(&mut &outside[..], l) => E::OutOfRange { .. },
            "TeleportMap: page run 99+2 out of range (memory has 100 pages)";
        read_frame(&mut &empty_run[..], l) => E::BadCount { .. }, "TeleportMap: count 0 outside";
        read_frame(&mut &overflow[..], l) => E::BadField { .. }, "overflows";
        read_frame(&mut &ragged[..], l) => E::BadLength { .. }, "a multiple of 24";
        read_frame(&mut &big_offer[..], l) => E::BadField { .. },
            "TeleportOffer: 101 blocks of 4096 bytes for 100 pages";
        read_frame(&mut &bad_ack[..], l) => E::BadField { .. }, "accepted is 2";
        read_frame(&mut &done[..], l) => E::BadField { .. }, "exceed memory of 100";
    }
}
