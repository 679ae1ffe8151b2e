//! The pre-shared-key challenge-response (frames in
//! [`crate::wire::protocol`]'s `auth.rs`): both ends prove they hold the
//! key with HMAC-SHA-256 (ring) over fresh nonces from both sides, the
//! session and the connection's place in it, so a recorded exchange
//! cannot be replayed and a connection cannot be spliced into another
//! session or stream. The key authenticates; it encrypts nothing.

use std::net::TcpStream;
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::{drain, Peer, TransportError};
use crate::wire::protocol::{
    self, AuthChallenge, AuthHello, AuthProof, Message, ProtocolError, AUTH_LEN, VERSION,
};

/// The shortest key accepted, in bytes.
pub(super) const MIN_KEY: usize = 16;

/// A key read from `--psk FILE`.
pub struct Psk {
    key: hmac::Key,
}

/// What each side's MAC covers; the labels keep the two apart, so one
/// side's MAC is never the other's.
fn message(label: &[u8], conn: u32, session: u64, nonces: (&[u8], &[u8])) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + 2 * AUTH_LEN);
    m.extend_from_slice(b"livemig psk v3 ");
    m.extend_from_slice(label);
    m.extend_from_slice(&conn.to_le_bytes());
    m.extend_from_slice(&session.to_le_bytes());
    m.extend_from_slice(nonces.0);
    m.extend_from_slice(nonces.1);
    m
}

fn nonce() -> Result<[u8; AUTH_LEN], TransportError> {
    let mut n = [0u8; AUTH_LEN];
    SystemRandom::new().fill(&mut n).map_err(|_| {
        TransportError::io(
            "PSK: drawing a nonce",
            std::io::Error::other("no randomness"),
        )
    })?;
    Ok(n)
}

fn proto(context: &str) -> impl FnOnce(ProtocolError) -> TransportError + '_ {
    move |source| match source {
        ProtocolError::Aborted(reason) => TransportError::Aborted {
            peer: if context.contains("receiver") {
                Peer::Receiver
            } else {
                Peer::Sender
            },
            reason,
        },
        source => TransportError::Protocol {
            context: context.into(),
            source,
        },
    }
}

impl Psk {
    pub(super) fn load(path: &Path) -> Result<Psk, TransportError> {
        let bytes = std::fs::read(path).map_err(|source| TransportError::Read {
            flag: "--psk",
            path: path.into(),
            source,
        })?;
        // A key written by `echo` or an editor ends in a newline.
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < MIN_KEY {
            let path = path.into();
            return Err(TransportError::ShortKey { path, len: end });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &bytes[..end]);
        Ok(Psk { key })
    }

    pub(super) fn tag(
        &self,
        label: &[u8],
        conn: u32,
        session: u64,
        nonces: (&[u8], &[u8]),
    ) -> [u8; AUTH_LEN] {
        let tag = hmac::sign(&self.key, &message(label, conn, session, nonces));
        let mut out = [0u8; AUTH_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Compared in constant time (ring's `verify`).
    fn check(
        &self,
        label: &[u8],
        conn: u32,
        session: u64,
        nonces: (&[u8], &[u8]),
        mac: &[u8],
    ) -> bool {
        hmac::verify(&self.key, &message(label, conn, session, nonces), mac).is_ok()
    }

    /// The sender's side of connection `conn` of `session`.
    pub(super) fn client(
        &self,
        sock: &TcpStream,
        conn: u32,
        session: u64,
    ) -> Result<(), TransportError> {
        let mut s = sock;
        let ours = nonce()?;
        let hello = AuthHello {
            version: VERSION,
            conn,
            session,
            nonce: ours,
        };
        protocol::write_message(&mut s, &Message::AuthHello(hello))
            .map_err(proto("PSK: sending the challenge to the receiver"))?;
        let AuthChallenge { nonce: theirs, mac } = protocol::expect_message(&mut s, None)
            .map_err(proto("PSK: waiting for the receiver's answer"))?;
        let nonces = (&ours[..], &theirs[..]);
        if !self.check(b"receiver", conn, session, nonces, &mac) {
            let e = TransportError::WrongKey(Peer::Receiver);
            let why = "PSK authentication failed: the two ends' --psk keys differ";
            let _ = protocol::write_message(&mut s, &Message::abort(why));
            return Err(e);
        }
        let mac = self.tag(b"sender", conn, session, nonces);
        protocol::write_message(&mut s, &Message::AuthProof(AuthProof { mac }))
            .map_err(proto("PSK: answering the receiver's challenge"))?;
        Ok(())
    }

    /// The receiver's side: the connection and session the sender proved
    /// it opens.
    pub(super) fn server(&self, sock: &TcpStream) -> Result<(u32, u64), TransportError> {
        let r = self.serve(sock);
        if let Err(e) = &r {
            // Tell the sender why, unless it knows already.
            if !matches!(
                e,
                TransportError::WrongKey(_) | TransportError::Aborted { .. }
            ) {
                let why = Message::abort(crate::util::error::error_chain(e));
                let _ = protocol::write_message(&mut &*sock, &why);
            }
            drain(sock);
        }
        r
    }

    fn serve(&self, sock: &TcpStream) -> Result<(u32, u64), TransportError> {
        let mut s = sock;
        let hello: AuthHello = protocol::read_handshake(&mut s)
            .map_err(proto("PSK: waiting for the sender's challenge"))?;
        let (conn, session, theirs) = (hello.conn, hello.session, hello.nonce);
        let ours = nonce()?;
        let nonces = (&theirs[..], &ours[..]);
        let mac = self.tag(b"receiver", conn, session, nonces);
        let challenge = AuthChallenge { nonce: ours, mac };
        protocol::write_message(&mut s, &Message::AuthChallenge(challenge))
            .map_err(proto("PSK: answering the sender's challenge"))?;
        let AuthProof { mac } = protocol::expect_message(&mut s, None)
            .map_err(proto("PSK: waiting for the sender's proof"))?;
        if !self.check(b"sender", conn, session, nonces, &mac) {
            let e = TransportError::WrongKey(Peer::Sender);
            let why = "PSK authentication failed: the two ends' --psk keys differ";
            let _ = protocol::write_message(&mut s, &Message::abort(why));
            return Err(e);
        }
        Ok((conn, session))
    }
}
