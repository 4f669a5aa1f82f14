//! A small, non-interactive certificate authority for DICOM TLS nodes.
//!
//! DICOM over TLS (PS3.15 Annex B) needs every node to hold a certificate
//! that its peers trust, and a bedside appliance rarely has a hospital PKI
//! at hand. dcmtk ships `dcmtk_ca.pl`, a Perl script that drives the
//! interactive `openssl req` / `openssl ca` commands; this module does the
//! same job from Rust with no Perl, no OpenSSL configuration file and no
//! prompts, so `minipacs ca new` and `minipacs ca issue` can set up TLS in
//! one step each.
//!
//! The CA directory keeps the layout of `dcmtk_ca.pl` (and so of `openssl
//! ca`), so that administrators who know that tool find their way around and
//! OpenSSL tooling can still read it:
//!
//! ```text
//! DIR/cacert.pem          the CA certificate (public; distribute it to peers)
//! DIR/private/cakey.pem   the CA private key, PKCS#8 PEM, mode 0600
//! DIR/private/            mode 0700
//! DIR/serial              the next serial number, upper-case hex ("01")
//! DIR/index.txt           one line per issued certificate, in the
//!                         tab-separated `openssl ca` database format
//! ```
//!
//! Every file is first written to a temporary file in its destination folder,
//! synced, and then renamed into place ([`crate::durable`]): a crash never leaves a truncated key,
//! certificate or serial file behind, and private keys are created with mode
//! 0600 so they are never readable by others, not even for an instant.
//! Issuing holds an exclusive `flock` on the CA directory, so two concurrent
//! `issue` runs cannot hand out the same serial number.

use std::fs::{self, File, Permissions};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rsa::pkcs8::EncodePrivateKey;
use rsa::rand_core::{OsRng, RngCore};
use rustls_pki_types::{CertificateDer, DnsName, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::durable::{DurableError, Replace, Staged};
use crate::timestamp::{self, Precision};

/// Default common name of a new CA, used when the operator gives none.
pub const DEFAULT_CA_NAME: &str = "minipacs CA";
/// Default CA validity in days (ten years): the CA certificate is copied to
/// every peer, so replacing it is expensive and it should outlive the nodes.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate validity in days: short enough that a leaked node
/// key stops being useful, long enough not to be a chore.
pub const DEFAULT_CERT_DAYS: u32 = 365;
/// File name of the CA certificate inside the CA directory (as `dcmtk_ca.pl`).
pub const CA_CERT_FILE: &str = "cacert.pem";
/// Path of the CA private key relative to the CA directory (as `dcmtk_ca.pl`).
pub const CA_KEY_FILE: &str = "private/cakey.pem";

/// Folder holding the CA key; mode 0700 so its listing is private too.
const PRIVATE_DIR: &str = "private";
/// File holding the next serial number, as `openssl ca` keeps it.
const SERIAL_FILE: &str = "serial";
/// The `openssl ca` database of issued certificates.
const INDEX_FILE: &str = "index.txt";
/// Mode of private key files: owner read/write only.
const KEY_MODE: u32 = 0o600;
/// Mode of public files (certificates, serial, index).
const PUBLIC_MODE: u32 = 0o644;
/// Mode of the `private` folder.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// RFC 5280 4.1.2.2: a serial number is at most 20 octets once DER-encoded.
const MAX_SERIAL_LEN: usize = 20;
/// RFC 5280 upper bound for a common name (`ub-common-name`).
const MAX_CN_LEN: usize = 64;
/// Certificates start to be valid an hour in the past, so that a peer whose
/// clock runs a little behind does not reject a freshly issued certificate.
const CLOCK_SKEW: Duration = Duration::hours(1);
/// Prefix of temporary files, so that leftovers after a crash are recognisable.
const TEMP_PREFIX: &str = ".minipacs-ca-";

/// Options for [`new_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaOptions {
    /// Common name of the CA certificate; peers show it as the issuer.
    pub name: String,
    /// Validity of the CA certificate in days, counted from now.
    pub days: u32,
    /// Use an RSA 2048 key instead of ECDSA P-256, for peers whose TLS stack
    /// predates elliptic curves.
    pub rsa: bool,
}

impl Default for CaOptions {
    /// The defaults of `minipacs ca new`: "minipacs CA", ten years, ECDSA.
    fn default() -> Self {
        Self {
            name: DEFAULT_CA_NAME.to_owned(),
            days: DEFAULT_CA_DAYS,
            rsa: false,
        }
    }
}

/// Options for [`issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Node name: the subject common name and a subjectAltName. If it parses
    /// as an IP address it becomes an IP SAN, otherwise it must be a valid DNS
    /// name and becomes a DNS SAN, because TLS clients match peers by SAN.
    pub name: String,
    /// Validity in days, counted from now; capped at the CA's own expiry.
    pub days: u32,
    /// Use an RSA 2048 key instead of ECDSA P-256.
    pub rsa: bool,
    /// Further DNS names or IP addresses by which peers reach this node.
    pub extra_sans: Vec<String>,
}

impl IssueOptions {
    /// Options for node `name` with the defaults of `minipacs ca issue`:
    /// one year, ECDSA, no extra names. There is no `Default` because a node
    /// certificate without a name is useless.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            days: DEFAULT_CERT_DAYS,
            rsa: false,
            extra_sans: Vec::new(),
        }
    }
}

/// What [`issue`] produced, for the operator's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Serial number in upper-case hex, as `openssl x509 -serial` and
    /// `index.txt` show it, so that the certificate can be found again.
    pub serial_hex: String,
    /// End of validity in RFC 3339 (UTC), so the operator can plan renewal.
    pub not_after: String,
}

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file system operation failed; `op` says what was being done.
    #[error("{op} {}", .path.display())]
    Io {
        /// The operation, e.g. "reading".
        op: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `new_ca` found a CA (or part of one) in the directory and will not
    /// destroy it: its key may already have signed certificates in use.
    #[error("{} already exists; refusing to overwrite an existing CA", .path.display())]
    CaExists {
        /// The existing file or folder.
        path: PathBuf,
    },
    /// The CA path exists but is not a directory.
    #[error("{} is not a directory", .path.display())]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A CA or node name cannot be used.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The validity period is zero or does not fit a certificate.
    #[error("invalid validity of {days} days: must be at least 1 and end before the year 10000")]
    InvalidDays {
        /// The number of days requested.
        days: u32,
    },
    /// Certificate and key would be written to the same file.
    #[error("certificate and key must go to different files, both are {}", .path.display())]
    SameOutput {
        /// The path given twice.
        path: PathBuf,
    },
    /// `cacert.pem` is not a CA certificate this module can sign with.
    #[error("{} is not a usable CA certificate: {reason}", .path.display())]
    BadCaCert {
        /// Path of the certificate.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `private/cakey.pem` is not a PKCS#8 key that can sign.
    #[error("{} is not a usable CA private key (PKCS#8 ECDSA P-256/P-384 or RSA expected)", .path.display())]
    BadCaKey {
        /// Path of the key.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA key does not belong to the CA certificate, so certificates it
    /// signed would never verify.
    #[error("{} does not match the public key in {}", .key.display(), .cert.display())]
    KeyMismatch {
        /// Path of the key.
        key: PathBuf,
        /// Path of the certificate.
        cert: PathBuf,
    },
    /// The CA certificate has expired; certificates it signs would not verify.
    #[error("the CA certificate expired at {not_after}; create a new CA")]
    CaExpired {
        /// End of the CA validity, RFC 3339.
        not_after: String,
    },
    /// The `serial` file cannot be read as a serial number.
    #[error("{}: {reason}", .path.display())]
    BadSerial {
        /// Path of the serial file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Generating an RSA key failed.
    #[error("generating an RSA key failed")]
    Rsa(#[from] rsa::Error),
    /// Encoding an RSA key as PKCS#8 failed.
    #[error("encoding the RSA key as PKCS#8 failed")]
    Pkcs8(#[from] rsa::pkcs8::Error),
    /// Building or signing a certificate failed.
    #[error("creating the certificate failed")]
    Certificate(#[from] rcgen::Error),
}

/// Creates a new CA in `dir`: a self-signed CA certificate and its key, an
/// empty `index.txt` and a `serial` file starting at 01.
///
/// `dir` may be missing (it is created, with its parents) or an existing
/// folder, but must not already contain any of the CA files: overwriting a
/// CA would orphan every certificate it issued, so that is refused with
/// [`CaError::CaExists`].
pub fn new_ca(dir: &Path, opts: &CaOptions) -> Result<(), CaError> {
    validate_common_name(&opts.name)?;
    let (not_before, not_after) = validity(now_utc(), opts.days)?;

    // Follow a symlink here: DIR may well point at a mounted volume.
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(CaError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        }
        Err(e) => return Err(io_error("inspecting", dir)(e)),
    }
    let _lock = lock_dir(dir)?;
    for entry in [CA_CERT_FILE, PRIVATE_DIR, SERIAL_FILE, INDEX_FILE] {
        let path = dir.join(entry);
        match fs::symlink_metadata(&path) {
            Ok(_) => return Err(CaError::CaExists { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspecting", &path)(e)),
        }
    }

    let key = generate_key(opts.rsa)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.distinguished_name = common_name(&opts.name);
    // pathlen 0: this CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;

    let private = dir.join(PRIVATE_DIR);
    fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(&private)
        .map_err(|e| exists_or_io(e, "creating", &private))?;
    // The umask may have cleared bits of the mode; make it exactly 0700.
    fs::set_permissions(&private, Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(io_error("setting permissions of", &private))?;

    // The key goes first and the certificate last: `cacert.pem` present
    // means the CA is complete.
    let files = [
        (dir.join(CA_KEY_FILE), key.serialize_pem(), KEY_MODE),
        (
            dir.join(SERIAL_FILE),
            format!("{}\n", serial_hex(&[1])),
            PUBLIC_MODE,
        ),
        (dir.join(INDEX_FILE), String::new(), PUBLIC_MODE),
        (dir.join(CA_CERT_FILE), cert.pem(), PUBLIC_MODE),
    ];
    for (path, contents, mode) in files {
        stage(&path, contents.as_bytes(), mode)?.commit(Replace::Never)?;
    }
    Ok(())
}

/// Issues a node certificate signed by the CA in `ca_dir`: generates a new
/// key pair, writes the certificate to `cert_out` and the PKCS#8 private key
/// to `key_out` (mode 0600), records it in `index.txt` and advances `serial`.
///
/// The certificate is for both TLS server and client authentication,
/// because a DICOM node both accepts and opens associations. Existing files
/// at `cert_out` and `key_out` are replaced atomically, so that renewing a
/// node certificate is the same command as issuing it. The validity is
/// capped at the expiry of the CA certificate.
pub fn issue(
    ca_dir: &Path,
    cert_out: &Path,
    key_out: &Path,
    opts: &IssueOptions,
) -> Result<IssuedCert, CaError> {
    validate_common_name(&opts.name)?;
    let mut sans = vec![subject_alt_name(&opts.name)?];
    for extra in &opts.extra_sans {
        let san = subject_alt_name(extra)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let now = now_utc();
    let (not_before, not_after) = validity(now, opts.days)?;
    if cert_out == key_out {
        return Err(CaError::SameOutput {
            path: cert_out.to_path_buf(),
        });
    }

    let _lock = lock_dir(ca_dir)?;
    let ca = LoadedCa::load(ca_dir)?;
    if ca.not_after <= now {
        return Err(CaError::CaExpired {
            not_after: rfc3339(ca.not_after),
        });
    }
    let not_after = not_after.min(ca.not_after);

    let serial_path = ca_dir.join(SERIAL_FILE);
    let serial_text =
        fs::read_to_string(&serial_path).map_err(io_error("reading", &serial_path))?;
    let serial = parse_serial(&serial_text).map_err(|reason| CaError::BadSerial {
        path: serial_path.clone(),
        reason,
    })?;
    let next_serial = increment_serial(&serial).map_err(|reason| CaError::BadSerial {
        path: serial_path.clone(),
        reason,
    })?;

    let key = generate_key(opts.rsa)?;
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = common_name(&opts.name);
    params.subject_alt_names = sans;
    // ExplicitNoCa writes basicConstraints CA:FALSE (and a subject key
    // identifier), so no verifier can mistake the node for a CA.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = if opts.rsa {
        // RSA key exchange (TLS 1.2 without ECDHE) encrypts with the key.
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer)?;

    let index_path = ca_dir.join(INDEX_FILE);
    let mut index = match fs::read_to_string(&index_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_error("reading", &index_path)(e)),
    };
    if !index.is_empty() && !index.ends_with('\n') {
        index.push('\n');
    }
    index.push_str(&index_line(&serial, not_after, &opts.name));

    // Stage every file before committing any, so that an unwritable output
    // path fails without using up a serial number. Then the serial goes
    // first: a crash after it wastes a number but can never reuse one.
    let staged = [
        stage(
            &serial_path,
            format!("{}\n", serial_hex(&next_serial)).as_bytes(),
            PUBLIC_MODE,
        )?,
        stage(&index_path, index.as_bytes(), PUBLIC_MODE)?,
        stage(key_out, key.serialize_pem().as_bytes(), KEY_MODE)?,
        stage(cert_out, cert.pem().as_bytes(), PUBLIC_MODE)?,
    ];
    for file in staged {
        file.commit(Replace::Allowed)?;
    }

    Ok(IssuedCert {
        serial_hex: serial_hex(&serial),
        not_after: rfc3339(not_after),
    })
}

/// The CA as `issue` needs it: signer identity plus its expiry.
struct LoadedCa {
    /// Subject, key identifier and key of the CA, ready to sign.
    issuer: Issuer<'static, KeyPair>,
    /// End of the CA certificate's validity.
    not_after: OffsetDateTime,
}

impl LoadedCa {
    /// Reads `cacert.pem` and `private/cakey.pem` and checks that they make a
    /// usable pair, because signing with a key that does not match the CA
    /// certificate produces certificates that silently never verify.
    fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let bad_cert = |reason: String| CaError::BadCaCert {
            path: cert_path.clone(),
            reason,
        };

        let cert_pem = fs::read(&cert_path).map_err(io_error("reading", &cert_path))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem)
            .map_err(|e| bad_cert(format!("not PEM: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(bad_cert(format!("PEM label is {:?}", pem.label)));
        }
        let x509 = pem
            .parse_x509()
            .map_err(|e| bad_cert(format!("not X.509: {e}")))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(bad_cert("basicConstraints does not say CA:TRUE".into())),
            Err(e) => return Err(bad_cert(format!("bad basicConstraints: {e}"))),
        }

        let key_pem = fs::read_to_string(&key_path).map_err(io_error("reading", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::BadCaKey {
            path: key_path.clone(),
            source,
        })?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }

        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(pem.contents.as_slice()), key)
            .map_err(|e| bad_cert(e.to_string()))?;
        Ok(Self { issuer, not_after })
    }
}

/// Generates a node or CA key: ECDSA P-256 (small, fast, supported by every
/// current TLS stack) or, on request, RSA 2048 for older peers. rcgen's ring
/// backend cannot generate RSA keys, hence the `rsa` crate for that.
fn generate_key(rsa: bool) -> Result<KeyPair, CaError> {
    if !rsa {
        return Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?);
    }
    let private = rsa::RsaPrivateKey::new(&mut OsRng, 2048)?;
    let der = private.to_pkcs8_der()?;
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_bytes()),
        &rcgen::PKCS_RSA_SHA256,
    )?)
}

/// A random positive 16-byte serial for the self-signed CA certificate, so
/// that two CAs created with the same name never share issuer and serial.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    // Positive (top bit clear) and exactly 16 bytes long (next bit set).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A distinguished name holding just a common name: DICOM peers identify
/// nodes by SAN and AE title, so country and organisation add nothing.
fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Checks a name for use as common name: non-empty, within the X.509 length
/// limit, and free of control characters (which would also corrupt the
/// tab-separated `index.txt`).
fn validate_common_name(name: &str) -> Result<(), CaError> {
    let invalid = |reason| CaError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.trim().is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.chars().count() > MAX_CN_LEN {
        return Err(invalid(
            "longer than 64 characters, the X.509 limit for a common name",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("contains control characters"));
    }
    Ok(())
}

/// Turns a node name into a subjectAltName: an IP SAN if it parses as an IP
/// address, else a DNS SAN if it is a DNS name that rustls would accept as a
/// server name (so that our own TLS client can connect to it by that name).
fn subject_alt_name(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || CaError::InvalidName {
        name: name.to_owned(),
        reason: "neither an IP address nor a DNS name (letters, digits, '-', '_', '.'; \
                 no trailing dot, no wildcard)",
    };
    if name.ends_with('.') || DnsName::try_from(name).is_err() {
        return Err(invalid());
    }
    let ia5 = Ia5String::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(ia5))
}

/// Checks a validity period and returns (not before, not after): from an
/// hour ago (clock skew) to `days` from now, whole seconds as X.509 stores.
fn validity(now: OffsetDateTime, days: u32) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let invalid = CaError::InvalidDays { days };
    if days == 0 {
        return Err(invalid);
    }
    let not_after = now
        .checked_add(Duration::days(i64::from(days)))
        .filter(|t| t.year() <= 9999)
        .ok_or(invalid)?;
    Ok((now - CLOCK_SKEW, not_after))
}

/// The current time in UTC, truncated to whole seconds so that the time
/// reported to the operator is exactly the one in the certificate.
fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - Duration::nanoseconds(i64::from(now.nanosecond()))
}

/// A certificate date as RFC 3339 (`2026-01-31T12:00:00Z`): whole seconds,
/// as certificates carry them.
fn rfc3339(t: OffsetDateTime) -> String {
    timestamp::format(t, Precision::Seconds)
}

/// One `index.txt` line in the `openssl ca` database format: status `V`,
/// expiry (UTCTime before 2050, GeneralizedTime after, as in the
/// certificate), empty revocation date, serial, file name `unknown`, subject.
fn index_line(serial: &[u8], not_after: OffsetDateTime, name: &str) -> String {
    let year = not_after.year();
    let date = if (1950..2050).contains(&year) {
        format!("{:02}", year % 100)
    } else {
        format!("{year:04}")
    };
    format!(
        "V\t{date}{:02}{:02}{:02}{:02}{:02}Z\t\t{}\tunknown\t/CN={name}\n",
        u8::from(not_after.month()),
        not_after.day(),
        not_after.hour(),
        not_after.minute(),
        not_after.second(),
        serial_hex(serial)
    )
}

/// Parses the `serial` file: hex digits (any case, surrounding white space
/// allowed), a positive number that fits an X.509 serial. Returns the
/// minimal big-endian bytes.
fn parse_serial(text: &str) -> Result<Vec<u8>, &'static str> {
    let digits = text.trim();
    if digits.is_empty() {
        return Err("serial file is empty");
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("serial file does not hold a hexadecimal number");
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    let mut bytes = Vec::with_capacity(padded.len() / 2);
    for pair in padded.as_bytes().chunks(2) {
        let text = std::str::from_utf8(pair).map_err(|_| "serial file is not ASCII")?;
        bytes.push(u8::from_str_radix(text, 16).map_err(|_| "bad hex digit in serial file")?);
    }
    let first = bytes
        .iter()
        .position(|&b| b != 0)
        .ok_or("serial number is zero")?;
    let bytes = bytes.split_off(first);
    if !fits_serial(&bytes) {
        return Err("serial number is longer than X.509 allows (20 bytes)");
    }
    Ok(bytes)
}

/// Adds one to a big-endian serial number, keeping it within the X.509 limit.
fn increment_serial(serial: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut next = serial.to_vec();
    let mut carry = true;
    for byte in next.iter_mut().rev() {
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        if !overflow {
            carry = false;
            break;
        }
    }
    if carry {
        next.insert(0, 1);
    }
    if fits_serial(&next) {
        Ok(next)
    } else {
        Err("serial numbers are exhausted (next one exceeds 20 bytes)")
    }
}

/// Whether a positive minimal big-endian number encodes in at most 20 DER
/// octets (a set top bit costs a leading zero octet).
fn fits_serial(bytes: &[u8]) -> bool {
    let extra = usize::from(bytes.first().is_some_and(|b| b & 0x80 != 0));
    bytes.len() + extra <= MAX_SERIAL_LEN
}

/// Upper-case hex with two digits per byte, as `openssl ca` writes serials.
fn serial_hex(serial: &[u8]) -> String {
    serial.iter().map(|b| format!("{b:02X}")).collect()
}

/// Takes an exclusive `flock` on the CA directory for the rest of the
/// operation, so concurrent runs cannot issue the same serial twice.
fn lock_dir(dir: &Path) -> Result<Flock<File>, CaError> {
    let handle = File::open(dir).map_err(io_error("opening", dir))?;
    Flock::lock(handle, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_error("locking", dir)(io::Error::from(errno)))
}

/// Stages `contents` for `dest` under a temporary name in its folder,
/// written and synced with exactly `mode` ([`crate::durable::Staged`]),
/// waiting to be committed.
fn stage(dest: &Path, contents: &[u8], mode: u32) -> Result<Staged, CaError> {
    Ok(Staged::with_contents(
        dest,
        TEMP_PREFIX,
        contents,
        Some(mode),
    )?)
}

impl From<DurableError> for CaError {
    fn from(e: DurableError) -> Self {
        match e {
            DurableError::Exists { path } => CaError::CaExists { path },
            DurableError::Io { op, path, source } => CaError::Io { op, path, source },
        }
    }
}

/// Builds a closure that wraps an `io::Error` with what was being done where.
fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Maps "already exists" to [`CaError::CaExists`], anything else to I/O.
fn exists_or_io(error: io::Error, op: &'static str, path: &Path) -> CaError {
    if error.kind() == io::ErrorKind::AlreadyExists {
        CaError::CaExists {
            path: path.to_path_buf(),
        }
    } else {
        io_error(op, path)(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;

    /// Reads a PEM certificate file into DER bytes.
    fn read_cert_der(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).expect("certificate file is readable");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("certificate is PEM");
        assert_eq!(pem.label, "CERTIFICATE");
        pem.contents
    }

    /// Parses DER bytes as X.509.
    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).expect("certificate is X.509");
        assert!(rest.is_empty(), "no trailing bytes after the certificate");
        cert
    }

    /// The permission bits of a path.
    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .expect("path exists")
            .permissions()
            .mode()
            & 0o7777
    }

    /// A fresh CA in a temporary folder; the folder lives as long as the guard.
    fn make_ca(rsa: bool) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("temporary folder");
        let dir = tmp.path().join("ca");
        let opts = CaOptions {
            rsa,
            ..CaOptions::default()
        };
        new_ca(&dir, &opts).expect("new CA");
        (tmp, dir)
    }

    /// Issues a certificate for `opts` into `out`, returning cert and key paths.
    fn issue_into(ca: &Path, out: &Path, opts: &IssueOptions) -> (PathBuf, PathBuf, IssuedCert) {
        let cert = out.join(format!("{}.pem", opts.name));
        let key = out.join(format!("{}.key", opts.name));
        let issued = issue(ca, &cert, &key, opts).expect("issue");
        (cert, key, issued)
    }

    /// Runs `openssl` with `args`, returning success and combined output.
    fn openssl(args: &[&str]) -> (bool, String) {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl command line tool must be installed for this test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Checks the properties every node certificate must have, and that it
    /// chains to the CA by signature, issuer name and key identifier.
    fn check_node_cert(ca_dir: &Path, cert_path: &Path, key_path: &Path, opts: &IssueOptions) {
        let ca_der = read_cert_der(&ca_dir.join(CA_CERT_FILE));
        let ca = parse(&ca_der);
        let der = read_cert_der(cert_path);
        let cert = parse(&der);

        cert.verify_signature(Some(ca.public_key()))
            .expect("node certificate is signed by the CA key");
        assert_eq!(cert.issuer(), ca.subject());
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().expect("CN is a string"))
            .collect();
        assert_eq!(cn, [opts.name.as_str()]);

        let bc = cert
            .basic_constraints()
            .expect("basicConstraints parses")
            .expect("basicConstraints present");
        assert!(bc.critical);
        assert!(!bc.value.ca, "node certificate must be CA:FALSE");

        let eku = cert
            .extended_key_usage()
            .expect("EKU parses")
            .expect("EKU present")
            .value;
        assert!(
            eku.server_auth && eku.client_auth,
            "serverAuth and clientAuth"
        );

        let ku = cert
            .key_usage()
            .expect("keyUsage parses")
            .expect("keyUsage present")
            .value;
        assert!(ku.digital_signature());
        assert_eq!(ku.key_encipherment(), opts.rsa);
        assert!(!ku.key_cert_sign() && !ku.crl_sign());

        let ca_ski = ca
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            })
            .expect("CA has a subject key identifier");
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0)
                }
                _ => None,
            })
            .expect("node certificate has an authority key identifier");
        assert_eq!(aki, ca_ski);

        let key_pem = fs::read_to_string(key_path).expect("key is readable");
        assert!(
            key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "PKCS#8 PEM"
        );
        let key = KeyPair::from_pem(&key_pem).expect("key parses");
        assert_eq!(
            key.subject_public_key_info(),
            cert.public_key().raw,
            "key matches certificate"
        );
        let expected_alg = if opts.rsa {
            &rcgen::PKCS_RSA_SHA256
        } else {
            &rcgen::PKCS_ECDSA_P256_SHA256
        };
        assert_eq!(key.algorithm(), expected_alg);
        assert_eq!(mode(key_path), 0o600);
        assert_eq!(mode(cert_path), 0o644);
    }

    /// The subjectAltNames of a certificate as strings (IPs formatted).
    fn sans(der: &[u8]) -> Vec<String> {
        let cert = parse(der);
        let san = cert
            .subject_alternative_name()
            .expect("SAN parses")
            .expect("SAN present");
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => {
                        let octets: [u8; 4] = (*bytes).try_into().expect("4 bytes");
                        format!("IP:{}", IpAddr::from(octets))
                    }
                    16 => {
                        let octets: [u8; 16] = (*bytes).try_into().expect("16 bytes");
                        format!("IP:{}", IpAddr::from(octets))
                    }
                    _ => panic!("bad IP SAN length"),
                },
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect()
    }

    #[test]
    fn new_ca_layout_modes_and_certificate() {
        let (_tmp, dir) = make_ca(false);
        assert_eq!(mode(&dir.join(PRIVATE_DIR)), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_CERT_FILE)), 0o644);
        assert_eq!(
            fs::read_to_string(dir.join(SERIAL_FILE)).expect("serial"),
            "01\n"
        );
        assert_eq!(fs::read_to_string(dir.join(INDEX_FILE)).expect("index"), "");
        let key_pem = fs::read_to_string(dir.join(CA_KEY_FILE)).expect("key");
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        // No temporary files left behind.
        for entry in fs::read_dir(&dir)
            .expect("list")
            .chain(fs::read_dir(dir.join(PRIVATE_DIR)).expect("list"))
        {
            let name = entry.expect("entry").file_name();
            assert!(!name.to_string_lossy().starts_with(TEMP_PREFIX), "{name:?}");
        }

        let der = read_cert_der(&dir.join(CA_CERT_FILE));
        let ca = parse(&der);
        assert_eq!(ca.issuer(), ca.subject(), "self-signed");
        ca.verify_signature(None).expect("self-signature verifies");
        let cn: Vec<_> = ca
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().expect("CN is a string"))
            .collect();
        assert_eq!(cn, [DEFAULT_CA_NAME]);
        let bc = ca
            .basic_constraints()
            .expect("parses")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = ca.key_usage().expect("parses").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(ca.raw_serial()[0] & 0x80 == 0 && ca.raw_serial().len() == 16);

        let validity = ca.validity();
        let now = OffsetDateTime::now_utc();
        let span = validity.not_after.to_datetime() - now;
        assert!((span - Duration::days(i64::from(DEFAULT_CA_DAYS))).abs() < Duration::minutes(5));
        let before = now - validity.not_before.to_datetime();
        assert!((before - CLOCK_SKEW).abs() < Duration::minutes(5));
    }

    #[test]
    fn new_ca_refuses_to_overwrite() {
        let (_tmp, dir) = make_ca(false);
        let cert = fs::read(dir.join(CA_CERT_FILE)).expect("cert");
        let key = fs::read(dir.join(CA_KEY_FILE)).expect("key");
        let err = new_ca(&dir, &CaOptions::default()).expect_err("must refuse");
        assert!(matches!(err, CaError::CaExists { .. }), "{err:?}");
        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).expect("cert"), cert);
        assert_eq!(fs::read(dir.join(CA_KEY_FILE)).expect("key"), key);

        // A half-made CA (only the serial file) is refused too.
        let tmp = tempfile::tempdir().expect("temporary folder");
        fs::write(tmp.path().join(SERIAL_FILE), "05\n").expect("write");
        let err = new_ca(tmp.path(), &CaOptions::default()).expect_err("must refuse");
        assert!(matches!(err, CaError::CaExists { .. }), "{err:?}");
        assert_eq!(
            fs::read_to_string(tmp.path().join(SERIAL_FILE)).expect("serial"),
            "05\n"
        );
    }

    #[test]
    fn new_ca_in_existing_empty_folder() {
        let tmp = tempfile::tempdir().expect("temporary folder");
        new_ca(tmp.path(), &CaOptions::default()).expect("new CA in empty folder");
        assert!(tmp.path().join(CA_CERT_FILE).is_file());
    }

    #[test]
    fn issue_ec_node_certificate() {
        let (tmp, ca) = make_ca(false);
        let mut opts = IssueOptions::new("pacs.example.org");
        opts.extra_sans = vec![
            "192.168.1.10".into(),
            "pacs".into(),
            "fe80::1".into(),
            "pacs.example.org".into(), // duplicate of the name: dropped
        ];
        let (cert, key, issued) = issue_into(&ca, tmp.path(), &opts);
        check_node_cert(&ca, &cert, &key, &opts);
        assert_eq!(
            sans(&read_cert_der(&cert)),
            [
                "DNS:pacs.example.org",
                "IP:192.168.1.10",
                "DNS:pacs",
                "IP:fe80::1"
            ]
        );
        assert_eq!(issued.serial_hex, "01");
        let der = read_cert_der(&cert);
        let parsed = parse(&der);
        assert_eq!(parsed.raw_serial(), [1]);
        assert_eq!(
            rfc3339(parsed.validity().not_after.to_datetime()),
            issued.not_after
        );
    }

    #[test]
    fn issue_rsa_node_certificate_from_rsa_ca() {
        let (tmp, ca) = make_ca(true);
        let ca_key = fs::read_to_string(ca.join(CA_KEY_FILE)).expect("key");
        assert_eq!(
            KeyPair::from_pem(&ca_key).expect("key parses").algorithm(),
            &rcgen::PKCS_RSA_SHA256
        );
        let opts = IssueOptions {
            rsa: true,
            ..IssueOptions::new("modality-1")
        };
        let (cert, key, _) = issue_into(&ca, tmp.path(), &opts);
        check_node_cert(&ca, &cert, &key, &opts);
        assert_eq!(sans(&read_cert_der(&cert)), ["DNS:modality-1"]);
    }

    #[test]
    fn ip_name_becomes_ip_san_and_cn() {
        let (tmp, ca) = make_ca(false);
        let opts = IssueOptions::new("10.0.0.7");
        let (cert, key, _) = issue_into(&ca, tmp.path(), &opts);
        check_node_cert(&ca, &cert, &key, &opts);
        assert_eq!(sans(&read_cert_der(&cert)), ["IP:10.0.0.7"]);
    }

    #[test]
    fn serials_are_distinct_increasing_and_indexed() {
        let (tmp, ca) = make_ca(false);
        let (cert1, _, first) = issue_into(&ca, tmp.path(), &IssueOptions::new("node-a"));
        let (cert2, _, second) = issue_into(&ca, tmp.path(), &IssueOptions::new("node-b"));
        assert_eq!(
            (first.serial_hex.as_str(), second.serial_hex.as_str()),
            ("01", "02")
        );
        let der1 = read_cert_der(&cert1);
        let der2 = read_cert_der(&cert2);
        assert!(parse(&der1).serial < parse(&der2).serial);
        assert_eq!(
            fs::read_to_string(ca.join(SERIAL_FILE)).expect("serial"),
            "03\n"
        );

        let index = fs::read_to_string(ca.join(INDEX_FILE)).expect("index");
        let lines: Vec<Vec<&str>> = index.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines.len(), 2);
        for (fields, (serial, name)) in lines.iter().zip([("01", "node-a"), ("02", "node-b")]) {
            assert_eq!(fields.len(), 6, "{fields:?}");
            assert_eq!(fields[0], "V");
            assert!(
                fields[1].ends_with('Z') && fields[1].len() == 13,
                "{fields:?}"
            );
            assert_eq!(fields[2], "");
            assert_eq!(fields[3], serial);
            assert_eq!(fields[4], "unknown");
            assert_eq!(fields[5], format!("/CN={name}"));
        }

        // Re-issuing to the same files replaces them with a new key.
        let opts = IssueOptions::new("node-a");
        let key1 = fs::read(tmp.path().join("node-a.key")).expect("key");
        let (_, key, third) = issue_into(&ca, tmp.path(), &opts);
        assert_eq!(third.serial_hex, "03");
        assert_ne!(fs::read(&key).expect("key"), key1);
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn node_validity_is_capped_by_the_ca() {
        let tmp = tempfile::tempdir().expect("temporary folder");
        let ca = tmp.path().join("ca");
        let ca_opts = CaOptions {
            days: 10,
            ..CaOptions::default()
        };
        new_ca(&ca, &ca_opts).expect("new CA");
        let (cert, _, issued) = issue_into(&ca, tmp.path(), &IssueOptions::new("node"));
        let ca_der = read_cert_der(&ca.join(CA_CERT_FILE));
        let ca_not_after = parse(&ca_der).validity().not_after.to_datetime();
        let der = read_cert_der(&cert);
        assert_eq!(parse(&der).validity().not_after.to_datetime(), ca_not_after);
        assert_eq!(issued.not_after, rfc3339(ca_not_after));
    }

    #[test]
    fn wrong_ca_is_detected() {
        let (tmp, ca) = make_ca(false);
        let other_tmp = tempfile::tempdir().expect("temporary folder");
        let other = other_tmp.path().join("ca");
        new_ca(&other, &CaOptions::default()).expect("second CA with the same name");
        let (cert, _, _) = issue_into(&ca, tmp.path(), &IssueOptions::new("node"));

        let other_der = read_cert_der(&other.join(CA_CERT_FILE));
        let der = read_cert_der(&cert);
        assert!(
            parse(&der)
                .verify_signature(Some(parse(&other_der).public_key()))
                .is_err(),
            "a certificate must not verify against a different CA"
        );
        let (ok, text) = openssl(&[
            "verify",
            "-CAfile",
            &other.join(CA_CERT_FILE).to_string_lossy(),
            &cert.to_string_lossy(),
        ]);
        assert!(!ok, "openssl must reject the wrong CA: {text}");
    }

    #[test]
    fn openssl_accepts_ca_cert_and_key() {
        for rsa in [false, true] {
            let (tmp, ca) = make_ca(rsa);
            let opts = IssueOptions {
                rsa,
                extra_sans: vec!["127.0.0.1".into()],
                ..IssueOptions::new("localhost")
            };
            let (cert, key, _) = issue_into(&ca, tmp.path(), &opts);
            let ca_cert = ca.join(CA_CERT_FILE).to_string_lossy().into_owned();
            let cert = cert.to_string_lossy().into_owned();
            let key = key.to_string_lossy().into_owned();
            for purpose in ["sslserver", "sslclient"] {
                let (ok, text) = openssl(&[
                    "verify",
                    "-x509_strict",
                    "-purpose",
                    purpose,
                    "-CAfile",
                    &ca_cert,
                    &cert,
                ]);
                assert!(
                    ok && text.contains(": OK"),
                    "openssl verify ({purpose}): {text}"
                );
            }
            // OpenSSL reads both private keys, and the node key matches its
            // certificate.
            let (ok, text) = openssl(&[
                "pkey",
                "-in",
                &ca.join(CA_KEY_FILE).to_string_lossy(),
                "-noout",
            ]);
            assert!(ok, "openssl pkey (CA): {text}");
            let (ok, from_key) = openssl(&["pkey", "-in", &key, "-pubout"]);
            assert!(ok, "openssl pkey: {from_key}");
            let (ok, from_cert) = openssl(&["x509", "-in", &cert, "-noout", "-pubkey"]);
            assert!(ok, "openssl x509: {from_cert}");
            assert_eq!(from_key, from_cert);
        }
    }

    #[test]
    fn rustls_accepts_node_as_server_and_client() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::server::WebPkiClientVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        use std::sync::Arc;

        for rsa in [false, true] {
            let (tmp, ca) = make_ca(rsa);
            let opts = IssueOptions {
                rsa,
                extra_sans: vec!["127.0.0.1".into()],
                ..IssueOptions::new("pacs.local")
            };
            let (cert, _, _) = issue_into(&ca, tmp.path(), &opts);
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(read_cert_der(&ca.join(CA_CERT_FILE))))
                .expect("CA certificate is a valid trust anchor");
            let roots = Arc::new(roots);
            let node = CertificateDer::from(read_cert_der(&cert));
            let now = UnixTime::now();

            let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .expect("server verifier");
            for name in ["pacs.local", "127.0.0.1"] {
                let name = ServerName::try_from(name).expect("server name");
                server
                    .verify_server_cert(&node, &[], &name, &[], now)
                    .expect("rustls accepts the node as a TLS server");
            }
            let wrong = ServerName::try_from("other.local").expect("server name");
            assert!(server
                .verify_server_cert(&node, &[], &wrong, &[], now)
                .is_err());

            let client = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .expect("client verifier");
            client
                .verify_client_cert(&node, &[], now)
                .expect("rustls accepts the node as a TLS client");
        }
    }

    #[test]
    fn invalid_requests_use_no_serial() {
        let (tmp, ca) = make_ca(false);
        let out = tmp.path();
        let try_issue = |opts: &IssueOptions| {
            issue(&ca, &out.join("n.pem"), &out.join("n.key"), opts).expect_err("must fail")
        };
        for bad in ["", "has space", "*.wild", "trailing.", "-dash", "naïve"] {
            let err = try_issue(&IssueOptions::new(bad));
            assert!(
                matches!(err, CaError::InvalidName { .. }),
                "{bad:?}: {err:?}"
            );
        }
        let err = try_issue(&IssueOptions::new("a".repeat(65)));
        assert!(matches!(err, CaError::InvalidName { .. }), "{err:?}");
        let mut opts = IssueOptions::new("node");
        opts.extra_sans = vec!["bad name".into()];
        assert!(matches!(try_issue(&opts), CaError::InvalidName { .. }));
        let opts = IssueOptions {
            days: 0,
            ..IssueOptions::new("node")
        };
        assert!(matches!(try_issue(&opts), CaError::InvalidDays { days: 0 }));
        let opts = IssueOptions {
            days: u32::MAX,
            ..IssueOptions::new("node")
        };
        assert!(matches!(try_issue(&opts), CaError::InvalidDays { .. }));
        let same = out.join("same.pem");
        let err = issue(&ca, &same, &same, &IssueOptions::new("node")).expect_err("must fail");
        assert!(matches!(err, CaError::SameOutput { .. }), "{err:?}");
        // An output folder that does not exist fails before a serial is used.
        let missing = out.join("missing");
        let err = issue(
            &ca,
            &missing.join("n.pem"),
            &missing.join("n.key"),
            &IssueOptions::new("node"),
        )
        .expect_err("must fail");
        assert!(matches!(err, CaError::Io { .. }), "{err:?}");

        assert_eq!(
            fs::read_to_string(ca.join(SERIAL_FILE)).expect("serial"),
            "01\n"
        );
        assert_eq!(fs::read_to_string(ca.join(INDEX_FILE)).expect("index"), "");
        assert!(!out.join("n.pem").exists() && !out.join("n.key").exists());
    }

    #[test]
    fn missing_ca_and_mismatched_key_are_reported() {
        let tmp = tempfile::tempdir().expect("temporary folder");
        let err = issue(
            &tmp.path().join("nope"),
            &tmp.path().join("n.pem"),
            &tmp.path().join("n.key"),
            &IssueOptions::new("node"),
        )
        .expect_err("no CA");
        assert!(matches!(err, CaError::Io { .. }), "{err:?}");

        let (_a, ca) = make_ca(false);
        let (_b, other) = make_ca(false);
        fs::copy(other.join(CA_KEY_FILE), ca.join(CA_KEY_FILE)).expect("copy key");
        let err = issue(
            &ca,
            &tmp.path().join("n.pem"),
            &tmp.path().join("n.key"),
            &IssueOptions::new("node"),
        )
        .expect_err("mismatched key");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn serial_arithmetic() {
        assert_eq!(parse_serial("01\n"), Ok(vec![1]));
        assert_eq!(parse_serial(" 0a0B "), Ok(vec![0x0a, 0x0b]));
        assert_eq!(parse_serial("fff"), Ok(vec![0x0f, 0xff]));
        assert!(parse_serial("").is_err());
        assert!(parse_serial("00").is_err());
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial("+1").is_err());
        assert!(parse_serial(&"7f".repeat(20)).is_ok());
        assert!(parse_serial(&"80".repeat(20)).is_err());
        assert_eq!(increment_serial(&[1]), Ok(vec![2]));
        assert_eq!(increment_serial(&[0xff]), Ok(vec![1, 0]));
        assert_eq!(increment_serial(&[1, 0xff, 0xff]), Ok(vec![2, 0, 0]));
        // 19 bytes of 0xff carry into a 20th byte with the top bit clear: fits.
        assert_eq!(increment_serial(&[0xff; 19]).map(|s| s.len()), Ok(20));
        // 20 bytes whose top bit stays clear: fits.
        assert!(increment_serial(&[0x7f; 20]).is_ok());
        // A 20-byte serial that would need a 21st byte: exhausted.
        assert!(increment_serial(&[0xff; 20]).is_err());
        // 20 bytes with the top bit set would need a leading zero octet.
        assert!(increment_serial(&[&[0x7f][..], &[0xff; 19][..]].concat()).is_err());
        assert_eq!(serial_hex(&[1]), "01");
        assert_eq!(serial_hex(&[0xab, 0x0c]), "AB0C");
    }

    #[test]
    fn dates_are_formatted_like_rfc3339_and_openssl() {
        let at = |year| {
            time::Date::from_calendar_date(year, time::Month::February, 3)
                .and_then(|d| d.with_hms(4, 5, 6))
                .expect("valid date")
                .assume_utc()
        };
        let t = at(2031);
        assert_eq!(rfc3339(t), "2031-02-03T04:05:06Z");
        assert!(index_line(&[1], t, "n").starts_with("V\t310203040506Z\t\t01\t"));
        let late = at(2051);
        assert!(index_line(&[1], late, "n").starts_with("V\t20510203040506Z\t"));
    }
}
