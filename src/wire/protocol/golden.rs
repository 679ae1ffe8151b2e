//! The exact bytes of one frame of every kind, as hex: a change to any
//! layout shows up here, and must come with a protocol version bump.

use super::*;
use crate::wire::reduce::Codec;

fn read(bytes: &[u8], limits: &Limits) -> Result<Frame, ProtocolError> {
    read_frame(&mut &bytes[..], Some(limits))
}

/// Hex of `bytes`, for golden comparisons.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The exact bytes of one frame of every kind. These must never change
/// without a protocol version bump.
#[test]
fn golden_bytes() {
    const BIG: Limits = Limits {
        streams: 1,
        page_size: 4096,
        page_count: 1 << 60,
    };
    let control = [
        (
            Message::hello(4096, 1 << 30, 4, 0x0123_4567_89ab_cdef),
            "0100000028000000 4c4956454d494700 04000000 00100000 0000004000000000 \
             04000000 00000000 efcdab8967452301",
        ),
        (
            Message::Hello(Hello {
                version: VERSION,
                page_size: 65536,
                memory_bytes: 0x0000_0102_0304_0000,
                streams: 1,
                session: 9,
                postcopy: true,
            }),
            "0100000028000000 4c4956454d494700 04000000 00000100 0000040302010000 \
             01000000 01000000 0900000000000000",
        ),
        (
            Message::hello_ack(),
            "0200000010000000 4c4956454d494700 04000000 00000000",
        ),
        (
            Message::stream_hello(REQUEST_STREAM, 0x0123_4567_89ab_cdef),
            "0d00000018000000 4c4956454d494700 04000000 ffffffff efcdab8967452301",
        ),
        (
            Message::round_start(0x0102_0304, false),
            "0300000008000000 04030201 00000000",
        ),
        (
            Message::round_start(7, true),
            "0300010008000000 07000000 00000000",
        ),
        (
            Message::page_request(0x0102_0304_0506_0708, 31, 15),
            "1200000010000000 0807060504030201 1f000000 0f000000",
        ),
        (
            Message::round_end(3, 0x0102_0304_0506_0708),
            "0500000010000000 03000000 00000000 0807060504030201",
        ),
        (
            Message::round_ack(0x0a0b_0c0d),
            "0c00000008000000 0d0c0b0a 00000000",
        ),
        (
            Message::device_state(vec![1, 2, 3]),
            "0600000003000000 010203",
        ),
        (
            Message::resumed(1_500_000, 262_144),
            "0700000010000000 60e3160000000000 0000040000000000",
        ),
        (Message::complete(), "0900000000000000"),
        (
            Message::verdict(65536, 0, None),
            "0a00000018000000 0000010000000000 0000000000000000 ffffffffffffffff",
        ),
        (
            Message::verdict(65530, 6, Some(17)),
            "0a00000018000000 faff000000000000 0600000000000000 1100000000000000",
        ),
        (Message::abort("no room"), "0b00000007000000 6e6f20726f6f6d"),
        (
            Message::AuthHello(AuthHello {
                version: VERSION,
                conn: CONTROL_STREAM,
                session: 0x0123_4567_89ab_cdef,
                nonce: [0xa5; AUTH_LEN],
            }),
            "1300000038000000 4c4956454d494700 04000000 feffffff efcdab8967452301 \
             a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5",
        ),
        (
            Message::AuthChallenge(AuthChallenge {
                nonce: [0x11; AUTH_LEN],
                mac: [0x22; AUTH_LEN],
            }),
            "1400000040000000 \
             1111111111111111111111111111111111111111111111111111111111111111 \
             2222222222222222222222222222222222222222222222222222222222222222",
        ),
        (
            Message::AuthProof(AuthProof {
                mac: [0x33; AUTH_LEN],
            }),
            "1500000020000000 \
             3333333333333333333333333333333333333333333333333333333333333333",
        ),
        (
            Message::TeleportOffer(TeleportOffer {
                blocks: 0x0102_0304,
                block_size: 4096,
                samples: 64,
                digest: 0x0123_4567_89ab_cdef,
            }),
            "1600000018000000 0403020100000000 00100000 40000000 efcdab8967452301",
        ),
        (
            Message::TeleportAck(TeleportAck {
                accepted: true,
                storage_rate: 125_000_000,
                reason: String::new(),
            }),
            "1700000010000000 01000000 00000000 40597307 00000000",
        ),
        (
            Message::TeleportAck(TeleportAck {
                accepted: false,
                storage_rate: 0,
                reason: "no".into(),
            }),
            "1700000012000000 00000000 00000000 0000000000000000 6e6f",
        ),
        (
            Message::TeleportMap(TeleportMap(vec![
                MapEntry {
                    first_page: 5,
                    first_block: 0x0102,
                    count: 3,
                },
                MapEntry {
                    first_page: 9,
                    first_block: 0,
                    count: 1,
                },
            ])),
            "1800000030000000 0500000000000000 0201000000000000 03000000 00000000 \
             0900000000000000 0000000000000000 01000000 00000000",
        ),
        (Message::TeleportSync(TeleportSync), "1900000000000000"),
        (
            Message::TeleportDone(TeleportDone {
                pages: 10,
                skipped: 2,
                bytes: 0xa000,
                busy_ns: 0x0102_0304_0506,
            }),
            "1a00000020000000 0a00000000000000 0200000000000000 00a0000000000000 0605040302010000",
        ),
    ];
    for (m, want) in control {
        let want = want.replace(' ', "");
        assert_eq!(hex(&m.encode()), want, "{m:?}");
        assert_eq!(read(&unhex(&want), &BIG).unwrap(), Frame::Message(m));
    }
    // Run frames: the header and run header (what follows is raw bulk).
    let runs = [
        (
            pages_frame_header(0x0102_0304_0506_0708, 2, 4096),
            Frame::Run(PageRun::Pages {
                first_page: 0x0102_0304_0506_0708,
                count: 2,
            }),
            "0400000010200000 0807060504030201 02000000 00000000",
        ),
        (
            digests_frame_header(65534, 2),
            Frame::Digests {
                first_page: 65534,
                count: 2,
            },
            "0800000020000000 feff000000000000 02000000 00000000",
        ),
        (
            zero_frame_header(7, 60_000),
            Frame::Run(PageRun::ZeroPages {
                first_page: 7,
                count: 60_000,
            }),
            "0e00000010000000 0700000000000000 60ea0000 00000000",
        ),
        (
            discard_frame_header(0x0a0b, 256),
            Frame::Discard {
                first_page: 0x0a0b,
                count: 256,
            },
            "1100000010000000 0b0a000000000000 00010000 00000000",
        ),
        (
            compressed_frame_header(3, 4, Codec::Lz4, 100),
            Frame::Run(PageRun::CompressedPages {
                first_page: 3,
                count: 4,
                codec: Codec::Lz4,
                len: 100,
            }),
            "0f00000074000000 0300000000000000 04000000 01000000",
        ),
        (
            compressed_frame_header(3, 4, Codec::Zstd, 0x0102),
            Frame::Run(PageRun::CompressedPages {
                first_page: 3,
                count: 4,
                codec: Codec::Zstd,
                len: 0x0102,
            }),
            "0f00000012010000 0300000000000000 04000000 02000000",
        ),
        (
            xbzrle_frame_header(9, 2, 6),
            Frame::Run(PageRun::XbzrlePages {
                first_page: 9,
                count: 2,
                len: 6,
            }),
            "1000000016000000 0900000000000000 02000000 00000000",
        ),
    ];
    for (bytes, frame, want) in runs {
        let want = want.replace(' ', "");
        assert_eq!(hex(&bytes), want, "{frame:?}");
        assert_eq!(read(&unhex(&want), &BIG).unwrap(), frame);
    }
    let header = Header {
        kind: Kind::PageRequest,
        flags: 0,
        len: 0x0102_0304,
    };
    assert_eq!(hex(&header.encode()), "1200000004030201");
}
