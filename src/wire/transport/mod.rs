//! The connections of a migration, and how they are secured: plain TCP,
//! TCP under mutual TLS (`--tls-*`, rustls), or plain TCP opened by a
//! pre-shared-key challenge-response (`--psk`).
//!
//! [`Conn`] is one connection of any of the three kinds: it reads and
//! writes like a `TcpStream`, its clones share it (a reader thread and a
//! writer thread on one connection, a third that shuts it down), and it
//! still takes socket timeouts. A plain connection (PSK's too) writes
//! vectored straight from guest memory; a TLS one encrypts through rustls.
//!
//! Who may connect: under TLS, whoever holds a certificate signed by
//! `--tls-ca` (and named by `--tls-allow`, if given); under PSK, whoever
//! holds the key, proven per connection over fresh nonces and bound to the
//! session and the connection's place in it. PSK does not encrypt: the
//! pages travel in the clear and a man in the middle could alter them
//! after the exchange; TLS protects both.

pub mod certs;
mod psk;
mod tls;

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::wire::protocol::ProtocolError;

pub use tls::TlsFiles;

/// Which end of a connection the other one is, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Sender,
    Receiver,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Sender => "sender",
            Peer::Receiver => "receiver",
        })
    }
}

/// Setting up or opening a secured connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("reading {flag} {}", .path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{flag} {}: {what}", .path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("--psk {}: the key has {len} bytes; use at least {} (e.g. head -c 32 /dev/urandom > FILE)", .path.display(), psk::MIN_KEY)]
    ShortKey { path: PathBuf, len: usize },
    #[error("setting up TLS")]
    Config(#[source] rustls::Error),
    #[error("setting up TLS: --tls-ca")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("invalid --tls-allow \"{0}\": not a host name or IP address")]
    AllowName(String),
    #[error("{}", tls::explain(*.peer, .source))]
    Tls {
        peer: Peer,
        #[source]
        source: rustls::Error,
    },
    #[error("the {0}'s certificate names none of --tls-allow {1}")]
    NotAllowed(Peer, String),
    #[error("the sender connected without TLS, and this receiver requires it: give the sender --tls-ca, --tls-cert and --tls-key")]
    PlainSender,
    #[error("PSK authentication failed: the {0} holds a different key than this end's --psk")]
    WrongKey(Peer),
    #[error("the {peer} gave up: {reason}")]
    Aborted { peer: Peer, reason: String },
    #[error("this connection authenticated as {claimed}, then opened as {opened}")]
    Spliced { claimed: String, opened: String },
    #[error("refusing to {what} {addr} without authentication, as it is not a loopback address: give --tls-ca, --tls-cert and --tls-key, or --psk FILE (or --insecure to accept that anyone who reaches it can write guest memory)")]
    Exposed { what: &'static str, addr: String },
    #[error("{context}")]
    Protocol {
        context: String,
        #[source]
        source: ProtocolError,
    },
}

impl TransportError {
    /// An i/o error during the opening exchange, in context.
    fn io(context: &str, e: io::Error) -> TransportError {
        TransportError::Protocol {
            context: context.into(),
            source: ProtocolError::Io(e),
        }
    }
}

/// How this side secures every connection of a migration (parsed once,
/// from the flags).
#[derive(Clone, Default)]
pub enum Security {
    #[default]
    Plain,
    Tls(Arc<tls::Tls>),
    Psk(Arc<psk::Psk>),
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Security {
    /// Mutual TLS with this side's certificate and key, and the CA that
    /// signs the peer's; `allow`: the peer names accepted (empty: any).
    pub fn tls(files: &TlsFiles) -> Result<Self, TransportError> {
        Ok(Security::Tls(Arc::new(tls::Tls::load(files)?)))
    }

    /// The pre-shared key in `path`.
    pub fn psk(path: &std::path::Path) -> Result<Self, TransportError> {
        Ok(Security::Psk(Arc::new(psk::Psk::load(path)?)))
    }

    /// As the report says it: `plain`, `tls` or `psk`.
    pub fn name(&self) -> &'static str {
        match self {
            Security::Plain => "plain",
            Security::Tls(_) => "tls",
            Security::Psk(_) => "psk",
        }
    }

    /// Refuse a plain end reachable from beyond this machine unless
    /// `insecure`: `what` is "listen on" or "send to".
    pub fn check_exposure(
        &self,
        what: &'static str,
        addr: &str,
        insecure: bool,
    ) -> Result<(), TransportError> {
        if !matches!(self, Security::Plain) || insecure || is_loopback(addr) {
            return Ok(());
        }
        let addr = addr.into();
        Err(TransportError::Exposed { what, addr })
    }

    /// Open connection `conn` (`CONTROL_STREAM`, a data index or
    /// `REQUEST_STREAM`) of `session` on `sock`, connected to `addr`.
    pub fn client(
        &self,
        sock: TcpStream,
        addr: &str,
        conn: u32,
        session: u64,
    ) -> Result<Conn, TransportError> {
        match self {
            Security::Plain => Ok(Conn::plain(sock)),
            Security::Psk(k) => {
                k.client(&sock, conn, session)?;
                Ok(Conn::plain(sock))
            }
            Security::Tls(t) => t.client(sock, addr),
        }
    }

    /// Open a connection just accepted. PSK: also the connection and the
    /// session it authenticated for, which its `Hello` or `StreamHello`
    /// must then name.
    pub fn server(&self, sock: TcpStream) -> Result<(Conn, Option<(u32, u64)>), TransportError> {
        match self {
            Security::Plain => Ok((Conn::plain(sock), None)),
            Security::Psk(k) => {
                let claim = k.server(&sock)?;
                Ok((Conn::plain(sock), Some(claim)))
            }
            Security::Tls(t) => Ok((t.server(sock)?, None)),
        }
    }
}

/// Every address `addr` (host:port) resolves to is a loopback one.
fn is_loopback(addr: &str) -> bool {
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// One connection of a migration; clones share it.
#[derive(Clone)]
pub struct Conn {
    sock: Arc<TcpStream>,
    tls: Option<Arc<tls::Stream>>,
}

impl Conn {
    /// A plain TCP connection.
    pub fn plain(sock: TcpStream) -> Conn {
        let sock = Arc::new(sock);
        Conn { sock, tls: None }
    }

    /// Another handle on this connection (never fails; `TcpStream`'s
    /// signature, so callers read the same).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(self.clone())
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// Shut the connection down (TLS: saying so first, when writing ends).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Some(t), Shutdown::Write | Shutdown::Both) = (&self.tls, how) {
            t.close_notify(&self.sock);
        }
        self.sock.shutdown(how)
    }

    /// Without blocking: would a read return data (or the end) now?
    pub fn ready(&self) -> io::Result<bool> {
        match &self.tls {
            Some(t) => t.ready(&self.sock),
            None => peek(&self.sock),
        }
    }

    /// Wait up to `timeout` until a read would return data (or the end).
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.tls.is_some() && self.ready()? {
            return Ok(true);
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::Error::EINTR) => Ok(false),
            Ok(_) if self.tls.is_some() => self.ready(),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

/// A non-blocking peek: data or the end waiting to be read.
fn peek(sock: &TcpStream) -> io::Result<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut b = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(sock.as_raw_fd(), &mut b, flags) {
        Err(nix::Error::EAGAIN) => Ok(false),
        Err(nix::Error::EINTR) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            Some(t) => t.read(&self.sock, buf),
            None => (&*self.sock).read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            Some(t) => t.write(&self.sock, &[IoSlice::new(buf)]),
            None => (&*self.sock).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.tls {
            Some(t) => t.write(&self.sock, bufs),
            // Zero-copy: straight from guest memory into the socket.
            None => (&*self.sock).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// After refusing a peer: stop writing, and read what it still sends for
/// a moment, so closing does not reset the connection before the peer has
/// read why.
fn drain(sock: &TcpStream) {
    let _ = sock.shutdown(Shutdown::Write);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match (&*sock).read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => break,
        }
    }
}
