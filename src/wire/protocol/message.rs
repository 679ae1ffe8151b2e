//! [`Message`]: every control message, declared from one list.

use super::auth::{AuthChallenge, AuthHello, AuthProof};
use super::control::{
    Abort, Complete, Control, DeviceState, Greeting, PageRequest, Resumed, RoundAck, RoundEnd,
    RoundStart, Size, Verdict,
};
use super::handshake::{Hello, HelloAck, StreamHello};
use super::header::{
    bad_len, unexpected, Header, Kind, Limits, ProtocolError, HEADER_LEN, VERSION,
};
use super::teleport::{TeleportAck, TeleportDone, TeleportMap, TeleportOffer, TeleportSync};

/// Declares [`Message`] from the list of message types, with what joins
/// a kind to its type: nothing else lists the control messages.
macro_rules! messages {
    ($($name:ident,)+) => {
        /// A control message, fully decoded.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Message {
            $($name($name),)+
        }

        impl Message {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Message::$name(_) => $name::KIND,)+
                }
            }

            fn encode_payload(&self, out: &mut Vec<u8>) -> u16 {
                match self {
                    $(Message::$name(m) => m.encode(out),)+
                }
            }
        }

        /// The payload size of control frames of kind `kind`; `None` for
        /// the run frames.
        pub(super) fn size(kind: Kind) -> Option<Size> {
            $(if kind == $name::KIND {
                return Some($name::SIZE);
            })+
            None
        }

        fn decode_payload(
            h: &Header,
            p: Vec<u8>,
            lim: Option<&Limits>,
        ) -> Result<Message, ProtocolError> {
            $(if h.kind == $name::KIND {
                return $name::decode(h.flags, p, lim).map(Message::$name);
            })+
            Err(unexpected(h.kind, "a control frame"))
        }

        $(
            impl From<$name> for Message {
                fn from(m: $name) -> Message {
                    Message::$name(m)
                }
            }

            impl TryFrom<Message> for $name {
                type Error = Message;
                fn try_from(m: Message) -> Result<$name, Message> {
                    match m {
                        Message::$name(m) => Ok(m),
                        other => Err(other),
                    }
                }
            }
        )+
    };
}

messages! {
    Hello,
    HelloAck,
    StreamHello,
    RoundStart,
    PageRequest,
    RoundEnd,
    RoundAck,
    DeviceState,
    Resumed,
    Complete,
    Verdict,
    Abort,
    AuthHello,
    AuthChallenge,
    AuthProof,
    TeleportOffer,
    TeleportAck,
    TeleportMap,
    TeleportSync,
    TeleportDone,
}

/// Decodes the payload of control frame `h`, whose length its
/// [`Size::check`] passed: a handshake's greeting first, then the rest.
pub(super) fn decode(
    h: &Header,
    p: Vec<u8>,
    lim: Option<&Limits>,
) -> Result<Message, ProtocolError> {
    if let Some(Size::Greeting(n)) = size(h.kind) {
        Greeting::check(h.kind, &p)?;
        if p.len() != n {
            return Err(bad_len(h.kind, p.len() as u64, n));
        }
    }
    decode_payload(h, p, lim)
}

impl Message {
    pub fn hello(page_size: u32, memory_bytes: u64, streams: u32, session: u64) -> Message {
        Message::Hello(Hello {
            version: VERSION,
            page_size,
            memory_bytes,
            streams,
            session,
            postcopy: false,
        })
    }
    pub fn page_request(first_page: u64, count: u32, fault: u32) -> Message {
        Message::PageRequest(PageRequest {
            first_page,
            count,
            fault,
        })
    }
    pub fn stream_hello(index: u32, session: u64) -> Message {
        Message::StreamHello(StreamHello { index, session })
    }
    pub fn hello_ack() -> Message {
        Message::HelloAck(HelloAck { version: VERSION })
    }
    pub fn round_start(round: u32, stop_and_copy: bool) -> Message {
        Message::RoundStart(RoundStart {
            round,
            stop_and_copy,
        })
    }
    pub fn round_end(round: u32, pages: u64) -> Message {
        Message::RoundEnd(RoundEnd { round, pages })
    }
    pub fn round_ack(round: u32) -> Message {
        Message::RoundAck(RoundAck { round })
    }
    pub fn device_state(blob: Vec<u8>) -> Message {
        Message::DeviceState(DeviceState(blob))
    }
    pub fn resumed(resume_ns: u64, pages_received: u64) -> Message {
        Message::Resumed(Resumed {
            resume_ns,
            pages_received,
        })
    }
    pub fn complete() -> Message {
        Message::Complete(Complete)
    }
    pub fn verdict(
        verified_pages: u64,
        mismatched_pages: u64,
        first_mismatch: Option<u64>,
    ) -> Message {
        Message::Verdict(Verdict {
            verified_pages,
            mismatched_pages,
            first_mismatch,
        })
    }
    /// Abort with a reason; reasons over [`MAX_ABORT_REASON`](super::MAX_ABORT_REASON) bytes are cut on encode.
    pub fn abort(reason: impl Into<String>) -> Message {
        Message::Abort(Abort(reason.into()))
    }

    /// Header + payload. A `DeviceState` outside 1..=[`MAX_CONTROL_PAYLOAD`](super::MAX_CONTROL_PAYLOAD)
    /// bytes encodes a frame the peer rejects; `write_message` refuses it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; HEADER_LEN];
        let flags = self.encode_payload(&mut out);
        // Payloads are capped far below u32::MAX except an oversized
        // DeviceState, which write_message rejects; saturate rather than wrap.
        let len = u32::try_from(out.len() - HEADER_LEN).unwrap_or(u32::MAX);
        let kind = self.kind();
        out[..HEADER_LEN].copy_from_slice(&Header { kind, flags, len }.encode());
        out
    }
}
