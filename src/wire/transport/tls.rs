//! Mutual TLS 1.3 over one TCP connection (rustls with the ring provider):
//! loading the certificates, the handshake, and a stream that a reader
//! thread and a writer thread can share.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, SupportedProtocolVersion};

use super::{drain, Conn, Peer, TransportError};
use crate::wire::protocol::{self, Message, ProtocolError};

/// The files of `--tls-cert`, `--tls-key`, `--tls-ca` and the names of
/// `--tls-allow`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub allow: Vec<String>,
}

/// This side's TLS configuration, both roles.
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    allow: Vec<ServerName<'static>>,
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
/// Plaintext encrypted per lock of the connection.
const WRITE_CHUNK: usize = 1 << 20;

fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bad = |e| pem_err(flag, path, e, "is not a PEM certificate file");
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        let (path, what) = (path.into(), "holds no certificate");
        return Err(TransportError::Pem { flag, path, what });
    }
    Ok(certs)
}

fn pem_err(
    flag: &'static str,
    path: &Path,
    e: rustls::pki_types::pem::Error,
    what: &'static str,
) -> TransportError {
    let path = path.to_path_buf();
    match e {
        rustls::pki_types::pem::Error::Io(source) => TransportError::Read { flag, path, source },
        rustls::pki_types::pem::Error::NoItemsFound => {
            let what = "holds no private key";
            TransportError::Pem { flag, path, what }
        }
        _ => TransportError::Pem { flag, path, what },
    }
}

impl Tls {
    pub(super) fn load(f: &TlsFiles) -> Result<Tls, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs("--tls-cert", &f.cert)?;
        let key = PrivateKeyDer::from_pem_file(&f.key)
            .map_err(|e| pem_err("--tls-key", &f.key, e, "is not a PEM private key"))?;
        let mut roots = RootCertStore::empty();
        for c in certs("--tls-ca", &f.ca)? {
            roots.add(c).map_err(TransportError::Config)?;
        }
        let roots = Arc::new(roots);
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(TLS13)
            .map_err(TransportError::Config)?
            .with_root_certificates(Arc::clone(&roots))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(TransportError::Config)?;
        // Mutual: the receiver verifies the sender's certificate too.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(TransportError::Verifier)?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(TLS13)
            .map_err(TransportError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TransportError::Config)?;
        // No resumption: every connection is verified in full, and no
        // ticket arrives unasked while the sender watches for an Abort.
        server.send_tls13_tickets = 0;
        let allow = f
            .allow
            .iter()
            .map(|n| {
                ServerName::try_from(n.clone()).map_err(|_| TransportError::AllowName(n.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            allow,
        })
    }

    /// The sender's side: the receiver's certificate must be for the host
    /// of `addr` (and for a `--tls-allow` name, if given).
    pub(super) fn client(&self, sock: TcpStream, addr: &str) -> Result<Conn, TransportError> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name =
            ServerName::try_from(host.clone()).map_err(|_| TransportError::AllowName(host))?;
        let c = ClientConnection::new(Arc::clone(&self.client), name)
            .map_err(TransportError::Config)?;
        let mut c = Connection::Client(c);
        handshake(&mut c, &sock, Peer::Receiver)?;
        if !self.allowed(&c) {
            return Err(TransportError::NotAllowed(
                Peer::Receiver,
                self.allow_list(),
            ));
        }
        Ok(Stream::conn(c, sock, Peer::Receiver))
    }

    /// The receiver's side: a sender without TLS is told so in its own
    /// framing; one whose certificate is not allowed, over TLS.
    pub(super) fn server(&self, sock: TcpStream) -> Result<Conn, TransportError> {
        let mut first = [0u8; 1];
        match sock.peek(&mut first) {
            Ok(0) => return Err(closed()),
            // 0x16: a TLS handshake record.
            Ok(_) if first[0] != 0x16 => {
                let e = TransportError::PlainSender;
                let _ = protocol::write_message(&mut &sock, &Message::abort(e.to_string()));
                drain(&sock);
                return Err(e);
            }
            Ok(_) => {}
            Err(e) => return Err(TransportError::io("TLS handshake", e)),
        }
        let c = ServerConnection::new(Arc::clone(&self.server)).map_err(TransportError::Config)?;
        let mut c = Connection::Server(c);
        if let Err(e) = handshake(&mut c, &sock, Peer::Sender) {
            drain(&sock);
            return Err(e);
        }
        let allowed = self.allowed(&c);
        let mut conn = Stream::conn(c, sock, Peer::Sender);
        if !allowed {
            let e = TransportError::NotAllowed(Peer::Sender, self.allow_list());
            let _ = protocol::write_message(&mut conn, &Message::abort(e.to_string()));
            let _ = conn.shutdown(std::net::Shutdown::Write);
            drain(&conn.sock);
            return Err(e);
        }
        Ok(conn)
    }

    /// The peer's certificate is for one of the `--tls-allow` names.
    fn allowed(&self, c: &Connection) -> bool {
        if self.allow.is_empty() {
            return true;
        }
        let Some(cert) = c.peer_certificates().and_then(|c| c.first()) else {
            return false;
        };
        let Ok(parsed) = ParsedCertificate::try_from(cert) else {
            return false;
        };
        let ok = |n| rustls::client::verify_server_name(&parsed, n).is_ok();
        self.allow.iter().any(ok)
    }

    fn allow_list(&self) -> String {
        let names: Vec<String> = self.allow.iter().map(|n| n.to_str().into_owned()).collect();
        names.join(", ")
    }
}

fn closed() -> TransportError {
    let context = "TLS handshake".into();
    TransportError::Protocol {
        context,
        source: ProtocolError::Closed,
    }
}

fn handshake(c: &mut Connection, sock: &TcpStream, peer: Peer) -> Result<(), TransportError> {
    let mut s = sock;
    let io = |e| TransportError::io("TLS handshake", e);
    while c.is_handshaking() {
        while c.wants_write() {
            c.write_tls(&mut s).map_err(io)?;
        }
        if !c.is_handshaking() {
            break;
        }
        if c.read_tls(&mut s).map_err(io)? == 0 {
            return Err(closed());
        }
        if let Err(source) = c.process_new_packets() {
            // Send the alert that says why, as far as it goes.
            while c.wants_write() && c.write_tls(&mut s).is_ok() {}
            return Err(TransportError::Tls { peer, source });
        }
    }
    while c.wants_write() {
        c.write_tls(&mut s).map_err(io)?;
    }
    Ok(())
}

/// One line on what a TLS failure means for the user.
pub(super) fn explain(peer: Peer, e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                format!("the {peer}'s certificate is not signed by this end's --tls-ca")
            }
            C::Expired | C::ExpiredContext { .. } => {
                format!("the {peer}'s certificate has expired")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("the {peer}'s certificate is not valid yet")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("the {peer}'s certificate is not for the name or address it was reached at")
            }
            _ => format!("the {peer}'s certificate is not acceptable"),
        },
        E::AlertReceived(a) => match a {
            // A certificate of another CA with the same name fails its
            // signature check: DecryptError.
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError => format!(
                "the {peer} refused this end's certificate (is it signed by the {peer}'s --tls-ca?)"
            ),
            A::CertificateExpired => {
                format!("the {peer} refused this end's certificate as expired")
            }
            A::CertificateRequired => format!("the {peer} requires this end's certificate"),
            _ => format!("the {peer} ended the TLS session"),
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => format!(
            "the {peer} does not speak TLS: give both ends --tls-ca, --tls-cert and --tls-key"
        ),
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        _ => format!("TLS with the {peer} failed"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ciphertext read from the socket and not yet handed to rustls.
struct Inbox {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

/// An established TLS session over a socket it shares with its clones.
/// Locks, always in this order: `rx` (the reader) or `tx` (a writer),
/// then `conn`, held only while rustls works, never across a blocking
/// socket call.
pub(super) struct Stream {
    peer: Peer,
    conn: Mutex<Connection>,
    rx: Mutex<Inbox>,
    /// Serialises writers; holds their ciphertext on its way out.
    tx: Mutex<Vec<u8>>,
}

impl Stream {
    fn conn(mut c: Connection, sock: TcpStream, peer: Peer) -> Conn {
        c.set_buffer_limit(Some(WRITE_CHUNK));
        let rx = Inbox {
            buf: vec![0; 64 << 10].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        };
        let stream = Stream {
            peer,
            conn: Mutex::new(c),
            rx: Mutex::new(rx),
            tx: Mutex::new(Vec::new()),
        };
        let sock = Arc::new(sock);
        Conn {
            sock,
            tls: Some(Arc::new(stream)),
        }
    }

    fn fail(&self, source: rustls::Error) -> io::Error {
        let peer = self.peer;
        io::Error::new(
            io::ErrorKind::InvalidData,
            TransportError::Tls { peer, source },
        )
    }

    /// Hand what the inbox holds to rustls; true if it held anything.
    fn feed(&self, c: &mut Connection, rx: &mut Inbox) -> io::Result<bool> {
        if rx.start == rx.end {
            return Ok(false);
        }
        let mut pending = &rx.buf[rx.start..rx.end];
        let n = c.read_tls(&mut pending)?;
        rx.start += n;
        c.process_new_packets().map_err(|e| self.fail(e))?;
        Ok(true)
    }

    pub(super) fn read(&self, sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            {
                let mut c = lock(&self.conn);
                loop {
                    match c.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if self.feed(&mut c, &mut rx)? {
                        continue;
                    }
                    if rx.eof {
                        // rustls learns of the end: a read then gives 0
                        // after close_notify, UnexpectedEof without.
                        c.read_tls(&mut io::empty())?;
                        c.process_new_packets().map_err(|e| self.fail(e))?;
                        return match c.reader().read(buf) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                            r => r,
                        };
                    }
                    break;
                }
            }
            let n = loop {
                match (&*sock).read(&mut rx.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r?,
                }
            };
            (rx.start, rx.end, rx.eof) = (0, n, n == 0);
        }
    }

    /// Without blocking: plaintext (or the end) waiting to be read.
    pub(super) fn ready(&self, sock: &TcpStream) -> io::Result<bool> {
        use nix::sys::socket::{recv, MsgFlags};
        let mut rx = lock(&self.rx);
        let mut c = lock(&self.conn);
        loop {
            let st = c.process_new_packets().map_err(|e| self.fail(e))?;
            if st.plaintext_bytes_to_read() > 0 || st.peer_has_closed() || rx.eof {
                return Ok(true);
            }
            if self.feed(&mut c, &mut rx)? {
                continue;
            }
            match recv(sock.as_raw_fd(), &mut rx.buf, MsgFlags::MSG_DONTWAIT) {
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return Ok(false),
                Ok(n) => (rx.start, rx.end, rx.eof) = (0, n, n == 0),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Encrypt what rustls takes of `bufs` (at least one byte), then write
    /// the records out; returns the plaintext bytes taken.
    pub(super) fn write(&self, sock: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        let taken = {
            let mut c = lock(&self.conn);
            let mut taken = 0;
            for b in bufs.iter().filter(|b| !b.is_empty()) {
                let k = c.writer().write(b)?;
                taken += k;
                if k < b.len() {
                    break;
                }
            }
            tx.clear();
            while c.wants_write() {
                c.write_tls(&mut *tx)?;
            }
            taken
        };
        (&*sock).write_all(&tx)?;
        Ok(taken)
    }

    /// Tell the peer this side writes no more (best effort).
    pub(super) fn close_notify(&self, sock: &TcpStream) {
        let mut tx = lock(&self.tx);
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            tx.clear();
            while c.wants_write() {
                if c.write_tls(&mut *tx).is_err() {
                    break;
                }
            }
        }
        let _ = (&*sock).write_all(&tx);
    }
}
