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
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// How the receiver treats client certificates (dcmtk `-rc`, `-vc`, `-ic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
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
    /// rustls refused the combination (e.g. key and certificate do not match).
    #[error("{0}")]
    Rustls(String),
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

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE in file".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, SEC1 or PKCS#1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key ({e}); encrypted keys are not supported"),
    })
}

/// Loads CA certificates from files and folders into a root store.
pub fn read_roots(files: &[PathBuf], dirs: &[PathBuf]) -> Result<RootCertStore, TlsError> {
    let mut all = files.to_vec();
    for dir in dirs {
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
        all.extend(found);
    }
    let mut roots = RootCertStore::empty();
    for path in &all {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: path.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    Ok(roots)
}

/// Describes a certificate and checks that it is valid now.
pub fn check_leaf(path: &Path, der: &CertificateDer<'_>) -> Result<CertSummary, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("unparsable certificate: {e}"),
    })?;
    let validity = cert.validity();
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

/// Builds the receiver's configuration from its files.
pub fn server_config(files: &ServerTlsFiles) -> Result<(ServerConfig, CertSummary), TlsError> {
    let chain = read_certs(&files.cert)?;
    let summary = check_leaf(&files.cert, &chain[0])?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(provider(files.cipher_preference));
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match files.peer_cert {
        PeerCertPolicy::Ignore => builder.with_no_client_auth(),
        policy => {
            let roots = read_roots(&files.ca_files, &files.ca_dirs)?;
            if roots.is_empty() {
                return Err(TlsError::Rustls(
                    "client certificates are verified but no CA certificate was given \
                     (--add-cert-file / --add-cert-dir, or --peer-cert ignore)"
                        .into(),
                ));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if policy == PeerCertPolicy::Verify {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Rustls(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Rustls(format!(
            "{} and {}: {e}",
            files.key.display(),
            files.cert.display()
        ))
    })?;
    config.ignore_client_order = files.cipher_preference == CipherPreference::Chacha20;
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

/// The receiver's current TLS configuration, reloadable.
pub struct TlsReloader {
    files: ServerTlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    last_stamp: Mutex<Stamp>,
}

impl TlsReloader {
    /// Loads the files; fails if they do not make a working configuration.
    pub fn new(files: ServerTlsFiles) -> Result<(Self, CertSummary), TlsError> {
        let last_stamp = Mutex::new(stamp(&files));
        let (config, summary) = server_config(&files)?;
        Ok((
            TlsReloader {
                files,
                current: RwLock::new(Arc::new(config)),
                last_stamp,
            },
            summary,
        ))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads the files now. On failure the old configuration stays.
    pub fn reload(&self) -> Result<CertSummary, TlsError> {
        *self
            .last_stamp
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stamp(&self.files);
        let (config, summary) = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(summary)
    }

    /// Reloads if any file changed since the last load. Returns whether a
    /// change was seen.
    fn reload_if_changed(&self, why: &str) -> bool {
        let now = stamp(&self.files);
        {
            let mut last = self
                .last_stamp
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *last == now {
                return false;
            }
            *last = now;
        }
        self.reload_logged(why);
        true
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(s) => info!(
                why, subject = %s.subject, serial = %s.serial, not_after = %s.not_after,
                "TLS certificate reloaded; new handshakes use it"
            ),
            Err(e) => {
                warn!(why, error = %e, "TLS reload failed; the previous certificate keeps serving")
            }
        }
    }

    /// Reloads on SIGHUP and whenever the files change (checked every
    /// `poll`; certbot replaces the symlinks in `live/`, which a change of
    /// inode shows), until `stop` turns true.
    pub async fn watch(
        self: Arc<Self>,
        poll: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::net::server::stopped(&mut stop) => return,
                Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload_logged("SIGHUP");
                }
                _ = tick.tick() => {
                    self.reload_if_changed("files changed");
                }
            }
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
        read_roots(&files.ca_files, &[])?
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(provider(CipherPreference::Aes)))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    match &files.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((key, cert)) => {
            let chain = read_certs(cert)?;
            check_leaf(cert, &chain[0])?;
            builder
                .with_client_auth_cert(chain, read_key(key)?)
                .map_err(|e| {
                    TlsError::Rustls(format!("{} and {}: {e}", key.display(), cert.display()))
                })
        }
    }
}

/// Parses a server name for certificate verification (a DNS name or an IP).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| TlsError::Rustls(format!("server name {name}: {e}")))
}

/// The subject of the peer's leaf certificate, if it sent one.
pub fn peer_subject(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.subject().to_string())
}
