//! TLS for DICOM (PS3.15 Annex B.9, BCP 195): rustls configurations for the
//! receiver and the sender, and certificate reload without a restart.
//!
//! Policy: TLS 1.2 and 1.3 only, AEAD cipher suites only (rustls offers no
//! others), ECDSA and RSA certificates, client certificates required by
//! default. The crypto provider is `ring`: it cross-builds for the Pi with
//! Debian's cross compilers alone.
//!
//! Reload: the receiver keeps its current `ServerConfig` behind a lock and
//! hands a clone of the `Arc` to each new handshake, so a reload changes what
//! new connections see and nothing else: associations in flight keep the
//! session they negotiated. A new file set that does not load (unreadable,
//! key and certificate that do not match, an expired certificate) is logged
//! and the old one keeps serving.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// How the receiver treats client certificates (dcmtk `-rc`, `-vc`, `-ic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PeerCertPolicy {
    /// A client certificate is required and verified against the CA bundle.
    #[default]
    Require,
    /// A client certificate is optional; if sent, it must verify.
    Verify,
    /// Client certificates are not requested.
    Ignore,
}

/// Which AEAD the receiver prefers. Boards without AES instructions (the
/// Pi 4's Cortex-A72 in Debian's kernel config, the Pi 3) are several times
/// faster with ChaCha20-Poly1305.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CipherPreference {
    /// AES-GCM first (hardware AES: x86, Pi 5).
    #[default]
    Aes,
    /// ChaCha20-Poly1305 first, and the server's order wins.
    Chacha20,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// the file
        path: PathBuf,
        /// the error
        source: std::io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// the file
        path: PathBuf,
        /// what is missing or wrong
        what: String,
    },
    /// The certificate is not valid yet by this device's clock. On a
    /// device without a real-time clock that is nearly always the clock
    /// being behind (no NTP reached since a power cut), so it says so.
    #[error("{path}: {}", clock_behind(clock, not_before, "the certificate"))]
    ClockBehind {
        /// the file
        path: PathBuf,
        /// the device's clock when it was checked
        clock: String,
        /// start of validity
        not_before: String,
    },
    /// The certificate is outside its validity period.
    #[error("{path}: certificate not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        /// the file
        path: PathBuf,
        /// start of validity
        not_before: String,
        /// end of validity
        not_after: String,
    },
    /// The file holds the other half of the identity: a certificate where
    /// the key goes, or the reverse (the two paths given in the wrong order).
    #[error(
        "{path} holds a {holds}, not a {wanted}: --tls takes KEY then CERT \
         (in a configuration file: tls.key and tls.cert)"
    )]
    Swapped {
        /// the file
        path: PathBuf,
        /// what it holds (its PEM label)
        holds: String,
        /// what was expected there
        wanted: &'static str,
    },
    /// The private key is protected by a passphrase, which a service
    /// started unattended cannot type.
    #[error(
        "{path} holds an encrypted private key, which cannot be used unattended: \
         write a decrypted copy readable only by root, e.g. \
         openssl pkcs8 -topk8 -nocrypt -in {path} -out key.pem"
    )]
    EncryptedKey {
        /// the file
        path: PathBuf,
    },
    /// rustls refused the configuration (the protocol versions).
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// rustls refused the key with the certificate (they do not match, or
    /// the key's type is not usable).
    #[error("{} and {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        /// the key file
        key: PathBuf,
        /// the certificate file
        cert: PathBuf,
        /// why
        source: rustls::Error,
    },
    /// Client certificates are to be verified but no CA was given.
    #[error(
        "client certificates are verified but no CA certificate was given \
         (--add-cert-file / --add-cert-dir, or --peer-cert ignore)"
    )]
    NoClientCa,
    /// The CA certificates cannot verify client certificates.
    #[error("client verifier: {0}")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    /// Not a DNS name or an IP address.
    #[error("server name {name}: {source}")]
    ServerName {
        /// the name given
        name: String,
        /// why
        source: rustls_pki_types::InvalidDnsNameError,
    },
}

/// The files of a receiver's TLS identity and trust.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsFiles {
    /// private key (PKCS#8, SEC1 or PKCS#1 PEM)
    pub key: PathBuf,
    /// certificate chain, leaf first (e.g. Let's Encrypt `fullchain.pem`)
    pub cert: PathBuf,
    /// CA certificates that client certificates must chain to
    pub ca_files: Vec<PathBuf>,
    /// folders of CA certificates (`*.pem`, `*.crt`)
    pub ca_dirs: Vec<PathBuf>,
    /// client certificate policy
    pub peer_cert: PeerCertPolicy,
    /// cipher suite preference
    pub cipher_preference: CipherPreference,
}

/// What a loaded certificate is, for logs.
#[derive(Debug, Clone)]
pub struct CertSummary {
    /// subject of the leaf certificate
    pub subject: String,
    /// serial number of the leaf, hex
    pub serial: String,
    /// end of validity
    pub not_after: String,
}

/// The crypto provider with our cipher suite order.
pub fn provider(preference: CipherPreference) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let is_chacha =
        |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite()).contains("CHACHA20");
    if preference == CipherPreference::Chacha20 {
        provider.cipher_suites.sort_by_key(|s| !is_chacha(s));
    }
    provider
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A PEM file's bytes and where they came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    /// the file it was read from
    pub path: PathBuf,
    /// its contents
    pub pem: Vec<u8>,
}

impl PemFile {
    fn read(path: &Path) -> Result<Self, TlsError> {
        Ok(PemFile {
            path: path.to_path_buf(),
            pem: read(path)?,
        })
    }

    /// Every certificate in the file.
    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: self.path.clone(),
                what: format!("bad PEM: {e}"),
            })?;
        if certs.is_empty() {
            if let Some(key) = self
                .labels()
                .into_iter()
                .find(|l| l.ends_with("PRIVATE KEY"))
            {
                return Err(TlsError::Swapped {
                    path: self.path.clone(),
                    holds: key,
                    wanted: "certificate",
                });
            }
            return Err(TlsError::Pem {
                path: self.path.clone(),
                what: "no CERTIFICATE in file".into(),
            });
        }
        Ok(certs)
    }

    /// The private key in the file (PKCS#8, SEC1 or PKCS#1). A file that
    /// holds a certificate, or an encrypted key, is told apart by its
    /// content, so that the error names the fix.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let labels = self.labels();
        // OpenSSL's legacy encryption keeps the plain key's label and adds
        // a Proc-Type header; PKCS#8 encryption has its own label.
        let legacy_encrypted = self
            .pem
            .windows(b"Proc-Type: 4,ENCRYPTED".len())
            .any(|w| w == b"Proc-Type: 4,ENCRYPTED");
        if legacy_encrypted || labels.iter().any(|l| l == "ENCRYPTED PRIVATE KEY") {
            return Err(TlsError::EncryptedKey {
                path: self.path.clone(),
            });
        }
        PrivateKeyDer::from_pem_slice(&self.pem).map_err(|e| {
            match labels.into_iter().find(|l| l == "CERTIFICATE") {
                Some(holds) => TlsError::Swapped {
                    path: self.path.clone(),
                    holds,
                    wanted: "private key",
                },
                None => TlsError::Pem {
                    path: self.path.clone(),
                    what: format!("no usable private key ({e})"),
                },
            }
        })
    }

    /// The labels of the file's PEM sections (`CERTIFICATE`, `PRIVATE
    /// KEY`, ...), in order.
    fn labels(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.pem)
            .lines()
            .filter_map(|line| {
                line.trim()
                    .strip_prefix("-----BEGIN ")?
                    .strip_suffix("-----")
                    .map(str::to_string)
            })
            .collect()
    }
}

/// The bytes of a receiver's TLS identity and trust, read by whoever may
/// read them: the root keeper when privileges are separated, so that the
/// network-facing worker never needs access to the key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// private key
    pub key: PemFile,
    /// certificate chain, leaf first
    pub cert: PemFile,
    /// CA certificates for client verification
    pub cas: Vec<PemFile>,
}

impl TlsMaterial {
    /// Reads the files (CA folders expanded to their `*.pem`, `*.crt`, `*.cer`).
    pub fn read(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        let mut cas = Vec::new();
        for path in &files.ca_files {
            cas.push(PemFile::read(path)?);
        }
        for dir in &files.ca_dirs {
            let entries = fs::read_dir(dir).map_err(|source| TlsError::Read {
                path: dir.clone(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "pem" || x == "crt" || x == "cer")
                })
                .collect();
            found.sort();
            for path in found {
                cas.push(PemFile::read(&path)?);
            }
        }
        Ok(TlsMaterial {
            key: PemFile::read(&files.key)?,
            cert: PemFile::read(&files.cert)?,
            cas,
        })
    }
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    PemFile::read(path)?.certs()
}

/// Reads a private key (PKCS#8, SEC1 or PKCS#1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PemFile::read(path)?.key()
}

/// Puts CA certificates into a root store.
fn roots_of(cas: &[PemFile]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for file in cas {
        for cert in file.certs()? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: file.path.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    Ok(roots)
}

/// The words for a certificate that is not valid yet by this device's
/// clock, wherever that is told (the log, the status line, a drop's
/// result): what the clock reads, from when the certificate is valid, and
/// the setting that fixes it.
pub fn clock_behind(clock: &str, not_before: &str, which: &str) -> String {
    format!(
        "the clock reads {clock}, {which} is valid from {not_before}: set [time] ntp \
         (the device's clock is behind)"
    )
}

/// When a failed TLS handshake failed only because the peer's certificate
/// is not valid yet by this device's clock, the words for it
/// ([`clock_behind`]).
pub fn handshake_clock_behind(error: &std::io::Error) -> Option<String> {
    let inner = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext {
            time,
            not_before,
        }) => {
            let at = |t: &rustls::pki_types::UnixTime| {
                let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
                time::OffsetDateTime::from_unix_timestamp(secs)
                    .map(|t| crate::timestamp::format(t, crate::timestamp::Precision::Seconds))
                    .unwrap_or_else(|_| format!("{secs} s after 1970"))
            };
            Some(clock_behind(
                &at(time),
                &at(not_before),
                "the client certificate",
            ))
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet) => Some(
            "the client certificate is not valid yet by the device's clock: set [time] ntp \
             (the device's clock is behind)"
                .into(),
        ),
        _ => None,
    }
}

/// Describes a certificate and checks that it is valid now.
pub fn check_leaf(path: &Path, der: &CertificateDer<'_>) -> Result<CertSummary, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("unparsable certificate: {e}"),
    })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        return Err(TlsError::ClockBehind {
            path: path.to_path_buf(),
            clock: crate::timestamp::format(
                now.to_datetime(),
                crate::timestamp::Precision::Seconds,
            ),
            not_before: crate::timestamp::format(
                validity.not_before.to_datetime(),
                crate::timestamp::Precision::Seconds,
            ),
        });
    }
    if !validity.is_valid() {
        return Err(TlsError::NotValidNow {
            path: path.to_path_buf(),
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after: validity.not_after.to_string(),
    })
}

/// How the receiver negotiates, apart from its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPolicy {
    /// client certificate policy
    pub peer_cert: PeerCertPolicy,
    /// cipher suite preference
    pub cipher_preference: CipherPreference,
}

impl ServerTlsFiles {
    /// The negotiation policy part of these settings.
    pub fn policy(&self) -> TlsPolicy {
        TlsPolicy {
            peer_cert: self.peer_cert,
            cipher_preference: self.cipher_preference,
        }
    }
}

/// Builds the receiver's configuration; fails on anything that would not
/// serve: unreadable PEM, a certificate not valid now, a key that does not
/// match the certificate, no CA while client certificates are verified.
pub fn server_config(
    material: &TlsMaterial,
    policy: TlsPolicy,
) -> Result<(ServerConfig, CertSummary), TlsError> {
    let chain = material.cert.certs()?;
    let summary = check_leaf(&material.cert.path, &chain[0])?;
    let key = material.key.key()?;
    let provider = Arc::new(provider(policy.cipher_preference));
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match policy.peer_cert {
        PeerCertPolicy::Ignore => builder.with_no_client_auth(),
        peer_cert => {
            let roots = roots_of(&material.cas)?;
            if roots.is_empty() {
                return Err(TlsError::NoClientCa);
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if peer_cert == PeerCertPolicy::Verify {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(TlsError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::KeyMismatch {
                key: material.key.path.clone(),
                cert: material.cert.path.clone(),
                source,
            })?;
    config.ignore_client_order = policy.cipher_preference == CipherPreference::Chacha20;
    Ok((config, summary))
}

/// Identity of a file for change detection: modification time, length and
/// inode of what the path (through symlinks) names now.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &ServerTlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut paths: Vec<&PathBuf> = vec![&files.key, &files.cert];
    paths.extend(files.ca_files.iter());
    paths.extend(files.ca_dirs.iter());
    paths
        .into_iter()
        .map(|p| {
            fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

/// The receiver's current TLS configuration, replaceable while serving.
pub struct TlsReloader {
    policy: TlsPolicy,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    /// Builds the first configuration; fails if it would not serve.
    pub fn new(material: &TlsMaterial, policy: TlsPolicy) -> Result<(Self, CertSummary), TlsError> {
        let (config, summary) = server_config(material, policy)?;
        Ok((
            TlsReloader {
                policy,
                current: RwLock::new(Arc::new(config)),
            },
            summary,
        ))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Switches new handshakes to `material`. On failure the old
    /// configuration stays.
    pub fn apply(&self, material: &TlsMaterial) -> Result<CertSummary, TlsError> {
        let (config, summary) = server_config(material, self.policy)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(summary)
    }
}

/// Watches a receiver's TLS files: SIGHUP, or a change of any file (checked
/// every `poll`; certbot replaces the symlinks in `live/`, which a change
/// of inode shows), reads them again and hands the new material to
/// `apply`, which logs and says whether it took. Ends when `stop` is
/// cancelled.
pub async fn watch_files(
    files: ServerTlsFiles,
    poll: Duration,
    stop: tokio_util::sync::CancellationToken,
    mut apply: impl FnMut(TlsMaterial, &str),
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = stamp(&files);
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                if stamp(&files) == last {
                    continue;
                }
                "files changed"
            }
        };
        last = stamp(&files);
        match TlsMaterial::read(&files) {
            Ok(material) => apply(material, why),
            Err(e) => {
                warn!(why, error = %e, "TLS reload failed; the previous certificate keeps serving")
            }
        }
    }
}

/// Applies new material to a reloader in this process, logging the outcome.
pub fn apply_logged(reloader: &TlsReloader, material: &TlsMaterial, why: &str) -> bool {
    match reloader.apply(material) {
        Ok(s) => {
            info!(
                why, subject = %s.subject, serial = %s.serial, not_after = %s.not_after,
                "TLS certificate reloaded; new handshakes use it"
            );
            true
        }
        Err(e) => {
            warn!(why, error = %e, "TLS reload failed; the previous certificate keeps serving");
            false
        }
    }
}

/// The sender's TLS settings.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// our key and certificate chain; `None` for anonymous TLS
    pub identity: Option<(PathBuf, PathBuf)>,
    /// CA certificates the server's chain must end in; empty: the system's
    /// public roots
    pub ca_files: Vec<PathBuf>,
}

/// Builds the sender's configuration.
pub fn client_config(files: &ClientTlsFiles) -> Result<ClientConfig, TlsError> {
    let roots = if files.ca_files.is_empty() {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        roots
    } else {
        let cas = files
            .ca_files
            .iter()
            .map(|p| PemFile::read(p))
            .collect::<Result<Vec<_>, _>>()?;
        roots_of(&cas)?
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(provider(CipherPreference::Aes)))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    match &files.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((key, cert)) => {
            let chain = read_certs(cert)?;
            check_leaf(cert, &chain[0])?;
            builder
                .with_client_auth_cert(chain, read_key(key)?)
                .map_err(|source| TlsError::KeyMismatch {
                    key: key.clone(),
                    cert: cert.clone(),
                    source,
                })
        }
    }
}

/// The configuration minipacs connects to its `[[peer]]`s with (C-MOVE
/// destinations): the receiver's own key and certificate as the client
/// certificate, and the receiver's CA certificates as the roots the peer's
/// chain must end in (the system's public roots when there are none). Built
/// from the same material as the server's, so that it needs no file access
/// of its own and follows every reload.
pub fn peer_client_config(material: &TlsMaterial) -> Result<ClientConfig, TlsError> {
    let roots = if material.cas.is_empty() {
        let mut roots = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        roots
    } else {
        roots_of(&material.cas)?
    };
    let chain = material.cert.certs()?;
    ClientConfig::builder_with_provider(Arc::new(provider(CipherPreference::Aes)))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, material.key.key()?)
        .map_err(|source| TlsError::KeyMismatch {
            key: material.key.path.clone(),
            cert: material.cert.path.clone(),
            source,
        })
}

/// Parses a server name for certificate verification (a DNS name or an IP).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|source| TlsError::ServerName {
        name: name.to_string(),
        source,
    })
}

/// The subject of the peer's leaf certificate, if it sent one.
pub fn peer_subject(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.subject().to_string())
}

/// The common name (CN) values of the peer's leaf certificate subject, as
/// parsed attribute values: what the calling-AE allowlist's `cert_name`
/// matches. (Never split the subject's text: `O=x\, CN=PACS1` has no CN.)
pub fn peer_common_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn certificate(dn: DistinguishedName) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn common_names_are_parsed_values_not_subject_text() {
        // O = "x, CN=PACS1": the subject's text shows "CN=PACS1" after a
        // comma, but there is no common name attribute at all.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "x, CN=PACS1");
        let tricky = certificate(dn);
        let subject = peer_subject(Some(std::slice::from_ref(&tricky))).expect("parses");
        assert!(subject.contains("PACS1"), "{subject}");
        assert!(peer_common_names(Some(std::slice::from_ref(&tricky))).is_empty());

        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "PACS1");
        dn.push(DnType::OrganizationName, "Hospital, Radiology");
        let honest = certificate(dn);
        assert_eq!(
            peer_common_names(Some(std::slice::from_ref(&honest))),
            vec!["PACS1".to_string()]
        );
        assert!(peer_common_names(None).is_empty());
    }

    fn pem_file(name: &str, pem: String) -> PemFile {
        PemFile {
            path: PathBuf::from(name),
            pem: pem.into_bytes(),
        }
    }

    #[test]
    fn a_swapped_key_and_certificate_are_named_by_content() {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["pacs.example".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let cert_file = pem_file("server.pem", cert.pem());
        let key_file = pem_file("key.pem", key.serialize_pem());
        assert!(key_file.key().is_ok() && cert_file.certs().is_ok());

        let err = cert_file.key().expect_err("a certificate is no key");
        assert_eq!(
            err.to_string(),
            "server.pem holds a CERTIFICATE, not a private key: --tls takes KEY then CERT \
             (in a configuration file: tls.key and tls.cert)"
        );
        let err = key_file.certs().expect_err("a key is no certificate");
        assert!(
            err.to_string().starts_with(
                "key.pem holds a PRIVATE KEY, not a certificate: --tls takes KEY then CERT"
            ),
            "{err}"
        );
        // Neither: no hint that would mislead.
        let err = pem_file("notes.txt", "hello\n".into())
            .key()
            .expect_err("empty");
        assert!(!err.to_string().contains("--tls"), "{err}");
    }

    #[test]
    fn an_encrypted_key_says_how_to_decrypt_it() {
        let pkcs8 = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0123456789ABCDEF0123456789ABCDEF\n\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END RSA PRIVATE KEY-----\n";
        for text in [pkcs8, legacy] {
            let err = pem_file("privkey.pem", text.into())
                .key()
                .expect_err("encrypted");
            assert!(
                err.to_string()
                    .contains("openssl pkcs8 -topk8 -nocrypt -in privkey.pem -out key.pem"),
                "{err}"
            );
        }
    }
}
