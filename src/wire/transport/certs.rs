//! `livemig certs DIR --hosts a,b`: a CA and a certificate per host for a
//! testbed (rcgen), as PEM files: `ca.crt`, `ca.key`, `a.crt`, `a.key`, ...
//! A host certificate names its host (a DNS name, or an IP address if
//! the name is one) and also `localhost` and 127.0.0.1, so the same files
//! serve loopback tests; it serves as both client and server certificate,
//! since each end of a migration is verified by the other.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Making or writing the certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("invalid host name \"{0}\" for a certificate")]
    Name(String, #[source] rcgen::Error),
    #[error("making a certificate")]
    Make(#[source] rcgen::Error),
    #[error("writing {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("--hosts names no host")]
    NoHosts,
}

/// How long a host certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday, for `days` days.
    Days(i64),
    /// Ended yesterday (to test that it is refused).
    Expired,
}

fn params(names: Vec<SanType>, cn: &str, validity: Validity) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = names;
    p.distinguished_name.push(DnType::CommonName, cn);
    let (now, day) = (time::OffsetDateTime::now_utc(), time::Duration::DAY);
    (p.not_before, p.not_after) = match validity {
        Validity::Days(d) => (now - day, now + day * i32::try_from(d).unwrap_or(i32::MAX)),
        Validity::Expired => (now - day * 30, now - day),
    };
    p
}

fn san(name: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name
        .try_into()
        .map_err(|e| CertsError::Name(name.into(), e))?;
    Ok(SanType::DnsName(dns))
}

/// Write `text` to `dir/file`, readable by its owner only if it is a key.
fn write(dir: &Path, file: &str, text: &str) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    let mode = if file.ends_with(".key") { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CertsError::Write(path, e))
}

/// Write a new CA and a certificate per host into `dir` (made if
/// missing); returns the files written.
pub fn generate(dir: &Path, hosts: &[(String, Validity)]) -> Result<Vec<PathBuf>, CertsError> {
    if hosts.is_empty() {
        return Err(CertsError::NoHosts);
    }
    std::fs::create_dir_all(dir).map_err(|e| CertsError::Write(dir.into(), e))?;
    let mut ca = params(Vec::new(), "livemig testbed CA", Validity::Days(3650));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(CertsError::Make)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(CertsError::Make)?;
    write(dir, "ca.crt", &ca_cert.pem())?;
    write(dir, "ca.key", &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let mut written = vec![dir.join("ca.crt"), dir.join("ca.key")];
    for (host, validity) in hosts {
        let mut names = vec![san(host)?];
        for extra in ["localhost", "127.0.0.1"] {
            if host != extra {
                names.push(san(extra)?);
            }
        }
        let mut p = params(names, host, *validity);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(CertsError::Make)?;
        let cert = p.signed_by(&key, &issuer).map_err(CertsError::Make)?;
        write(dir, &format!("{host}.crt"), &cert.pem())?;
        write(dir, &format!("{host}.key"), &key.serialize_pem())?;
        written.push(dir.join(format!("{host}.crt")));
        written.push(dir.join(format!("{host}.key")));
    }
    Ok(written)
}
