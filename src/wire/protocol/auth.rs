//! Pre-shared-key authentication (`--psk`): a challenge-response that opens
//! every connection before its `Hello` or `StreamHello`.
//!
//! ```text
//! sender                                     receiver
//!   | AuthHello{magic,version,conn,session,  ->|  conn: CONTROL_STREAM, a data
//!   |           nonce_s}                       |  index or REQUEST_STREAM
//!   |<- AuthChallenge{nonce_r, mac_r}          |  mac_r = HMAC(K, "receiver" ‖ conn ‖ session ‖ nonce_s ‖ nonce_r)
//!   | AuthProof{mac_s}                       ->|  mac_s = HMAC(K, "sender" ‖ ...the same)
//!   | Hello / StreamHello as usual           ->|  must name the same conn and session
//! ```
//!
//! The MACs are computed in [`crate::wire::transport`]; here are only
//! their frames.

use zerocopy::byteorder::{LE, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::control::{layout, Control, Greeting, Size};
use super::handshake::Handshake;
use super::header::{Kind, Limits, ProtocolError};

/// Length of a nonce and of an HMAC-SHA-256 tag.
pub const AUTH_LEN: usize = 32;

/// The sender opens a connection with its nonce, naming the connection
/// (`CONTROL_STREAM`, a data index, `REQUEST_STREAM`) and the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthHello {
    pub version: u32,
    pub conn: u32,
    pub session: u64,
    pub nonce: [u8; AUTH_LEN],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct AuthHelloLayout {
    greeting: Greeting,
    conn: U32<LE>,
    session: U64<LE>,
    nonce: [u8; AUTH_LEN],
}

impl Control for AuthHello {
    const KIND: Kind = Kind::AuthHello;
    const SIZE: Size = Size::Greeting(size_of::<AuthHelloLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let l = AuthHelloLayout {
            greeting: Greeting::new(self.version),
            conn: U32::new(self.conn),
            session: U64::new(self.session),
            nonce: self.nonce,
        };
        out.extend_from_slice(l.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: AuthHelloLayout = layout(Self::KIND, &p)?;
        Ok(AuthHello {
            version: l.greeting.version.get(),
            conn: l.conn.get(),
            session: l.session.get(),
            nonce: l.nonce,
        })
    }
}
impl Handshake for AuthHello {}

/// The receiver's nonce, and its proof that it holds the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthChallenge {
    pub nonce: [u8; AUTH_LEN],
    pub mac: [u8; AUTH_LEN],
}

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct AuthChallengeLayout {
    nonce: [u8; AUTH_LEN],
    mac: [u8; AUTH_LEN],
}

impl Control for AuthChallenge {
    const KIND: Kind = Kind::AuthChallenge;
    const SIZE: Size = Size::Fixed(size_of::<AuthChallengeLayout>());
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        let (nonce, mac) = (self.nonce, self.mac);
        out.extend_from_slice(AuthChallengeLayout { nonce, mac }.as_bytes());
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let l: AuthChallengeLayout = layout(Self::KIND, &p)?;
        Ok(AuthChallenge {
            nonce: l.nonce,
            mac: l.mac,
        })
    }
}

/// The sender's proof that it holds the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthProof {
    pub mac: [u8; AUTH_LEN],
}

impl Control for AuthProof {
    const KIND: Kind = Kind::AuthProof;
    const SIZE: Size = Size::Fixed(AUTH_LEN);
    fn encode(&self, out: &mut Vec<u8>) -> u16 {
        out.extend_from_slice(&self.mac);
        0
    }
    fn decode(_: u16, p: Vec<u8>, _: Option<&Limits>) -> Result<Self, ProtocolError> {
        let mac: [u8; AUTH_LEN] = layout(Self::KIND, &p)?;
        Ok(AuthProof { mac })
    }
}
