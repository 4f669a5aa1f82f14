//! The configuration model: one TOML file, every key optional, defaults that
//! run a working receiver, and validation that names the key and line of
//! every problem.
//!
//! A configuration is made in one pipeline, as TOML tables laid one over
//! the other and deserialized once into [`Config`]:
//!
//! 1. the defaults: `hal-config/minipacs.toml`, embedded in the binary (the
//!    file a technician reads is the truth; [`Config::default`] is it);
//! 2. the board profile the file names (`board = "pi4"`,
//!    `hal-config/boards/*.toml`);
//! 3. the file;
//! 4. the command line's options ([`Config::load_with`]).
//!
//! Problems are located by their key path in the file's parsed document
//! (its spans), so `port` under `[tls]` is reported at its own line. A
//! check tells every problem at once: unknown keys (each with the known key
//! it most likely meant) are set aside, and a value of the wrong type is
//! replaced by its default, so that the rest of the file is checked too.
//!
//! Every key is classified once, in `Config::split`, as applied while
//! serving ([`LiveConfig`]) or read at start-up (a change restarts); a key
//! added to [`Config`] does not compile until it is classified there.

use dimse::ae::AeTitle;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::store::Layout;
use crate::tls::{CipherPreference, PeerCertPolicy, ServerTlsFiles};

/// The documented default configuration, as shipped.
pub const DEFAULT_TOML: &str = include_str!("../../hal-config/minipacs.toml");

/// The per-board profiles shipped in `hal-config/boards/`, embedded.
pub const BOARDS: &[(&str, &str)] = &[
    ("pi3", include_str!("../../hal-config/boards/pi3.toml")),
    ("pi4", include_str!("../../hal-config/boards/pi4.toml")),
    ("pi5", include_str!("../../hal-config/boards/pi5.toml")),
    (
        "qemu-virt",
        include_str!("../../hal-config/boards/qemu-virt.toml"),
    ),
    (
        "x86-dev",
        include_str!("../../hal-config/boards/x86-dev.toml"),
    ),
];

/// Profile keys that are not configuration: `target` is the build's.
const BOARD_ONLY_KEYS: &[&str] = &["target"];
/// Profile keys that belong under `[tls]` (a profile is one flat table).
const BOARD_TLS_KEYS: &[&str] = &["cipher_preference"];

/// The receiver's configuration. Every key has its default in
/// [`DEFAULT_TOML`], which is always the first layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Board profile (`pi3`, `pi4`, `pi5`, `qemu-virt`, `x86-dev`): its
    /// values apply wherever this file does not set the key itself.
    pub board: Option<String>,
    /// Our AE title: the called AE title an SCU must use.
    pub aetitle: String,
    /// Address to listen on.
    pub bind: IpAddr,
    /// TCP port for plain DICOM.
    pub port: u16,
    /// The store's root folder.
    pub output_directory: PathBuf,
    /// The index database (SQLite): relative paths are relative to the
    /// store's root. Derived from the stored files, rebuilt when missing.
    pub index_file: PathBuf,
    /// How stored files are named.
    pub layout: Layout,
    /// Make every object durable (fdatasync + folder fsync) before success.
    pub fsync: bool,
    /// Replace an object that has the same SOP Instance UID (default: keep both).
    pub overwrite: bool,
    /// Refuse objects (A700) while free space is below this percentage.
    pub free_space_reserve_percent: u8,
    /// Concurrent associations; one more is answered with A-ASSOCIATE-RJ
    /// (transient), unless one has been idle `evict_idle_after` seconds.
    pub max_associations: usize,
    /// Concurrent associations from one address (0: no cap of its own).
    pub max_associations_per_peer: usize,
    /// With every association slot taken, the association idle longest, if
    /// idle at least this many seconds, is stopped to admit a new one (0:
    /// never).
    pub evict_idle_after: u64,
    /// Connections that have not yet sent an A-ASSOCIATE-RQ; past this the
    /// oldest of them is dropped to make room.
    pub max_pending_connections: usize,
    /// Largest PDU we receive (bytes); also the per-association buffer size.
    pub max_pdu: u32,
    /// Seconds a connection has to complete association negotiation.
    pub acse_timeout: u64,
    /// Seconds an association may stay silent before it is aborted.
    pub dimse_timeout: u64,
    /// Seconds objects in flight get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: u64,
    /// Accept SOP classes outside the DICOM root (vendors' private storage).
    pub accept_private_sop_classes: bool,
    /// The most matches one C-FIND answers (0: no limit); past it the
    /// answer ends with A700 (as Orthanc's `LimitFindResults`).
    pub max_find_results: usize,
    /// Serve plain (unencrypted) DICOM on `port`.
    pub listen_plain: bool,
    /// Folder a technician drops files into (`minipacs.toml`,
    /// `collect-logs`); unset: none is watched.
    pub drop_directory: Option<PathBuf>,
    /// sysfs `brightness` file of an LED that blinks on each stored object
    /// (opened by the keeper, which may write it, for the worker).
    pub activity_led: Option<PathBuf>,
    /// Folder of the bounded service logs and the audit trail.
    pub log_directory: PathBuf,
    /// Disk budget of the service logs (bytes; the audit trail has the same).
    pub log_max_bytes: u64,
    /// When started as root: the user the network-facing worker runs as.
    pub user: String,
    /// When started as root: the worker's group (default: the user's group).
    pub group: Option<String>,
    /// DICOM over TLS.
    pub tls: TlsConfig,
    /// Calling AE titles allowed to associate, each optionally bound to a
    /// host or a TLS client certificate name; empty: anyone who calls our
    /// AE title. Applied without a restart.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    /// Known DICOM nodes (`[[peer]]`): the destinations a C-MOVE may name,
    /// by AE title. Applied without a restart.
    #[serde(default)]
    pub peer: Vec<PeerEntry>,
    /// Forwarding rules (`[[forward]]`): which stored objects are queued
    /// for which `[[peer]]`. Applied without a restart.
    #[serde(default)]
    pub forward: Vec<ForwardRule>,
    /// Seconds a storage commitment request (`[[forward]]` with `commit =
    /// true`) waits for its report before it is asked again.
    pub commitment_timeout: u64,
    /// Retention (`[retention]`): deleting delivered studies to keep the
    /// card from filling. Off when absent. Applied without a restart.
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// The device's clock (`[time]`). Applied by the system
    /// ([`crate::system`]), not by the service: a change neither restarts
    /// nor reconfigures it.
    #[serde(default)]
    pub time: TimeConfig,
    /// The device's network address (`[network]`). Applied by the system
    /// ([`crate::system`]), which rolls a change back when it leaves the
    /// device without a link.
    #[serde(default)]
    pub network: NetworkConfig,
}

/// `[time]`: where the device's clock comes from. A Pi has no real-time
/// clock; without a reachable NTP server the clock only ever moves forward
/// from its last saved value, and certificates issued since look "not yet
/// valid".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// NTP servers (host names or addresses), e.g. the hospital's own;
    /// empty: the image's default (Debian's public pool)
    #[serde(default)]
    pub ntp: Vec<String>,
}

/// `[network]`: the wired interface's address. Unset `address`: DHCP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// a static address with its prefix length (`192.0.2.10/24`); unset:
    /// the address, gateway and DNS servers come from DHCP
    #[serde(default)]
    pub address: Option<InterfaceAddress>,
    /// the default gateway (with a static address)
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// DNS servers (with DHCP: in addition to the ones it gives)
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// the device's host name; unset: `minipacs`
    #[serde(default)]
    pub hostname: Option<String>,
}

/// An interface address and its prefix length, written `192.0.2.10/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceAddress {
    /// the address
    pub ip: IpAddr,
    /// the prefix length (the netmask's bits)
    pub prefix: u8,
}

impl InterfaceAddress {
    /// Whether `other` is on this address's own network (the gateway must be).
    pub fn contains(&self, other: IpAddr) -> bool {
        let bits = u32::from(self.prefix);
        match (self.ip, other) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for InterfaceAddress {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let wrong = || {
            format!("{text:?} is not an address with its prefix length (e.g. \"192.0.2.10/24\")")
        };
        let (ip, prefix) = text.split_once('/').ok_or_else(wrong)?;
        let ip: IpAddr = ip.trim().parse().map_err(|_| wrong())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| wrong())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix == 0 || prefix > max {
            return Err(format!("{text:?}: the prefix length must be 1 to {max}"));
        }
        Ok(InterfaceAddress { ip, prefix })
    }
}

impl From<InterfaceAddress> for String {
    fn from(a: InterfaceAddress) -> String {
        a.to_string()
    }
}

impl fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// The keys applied by the system rather than the service
/// ([`crate::system`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemConfig {
    /// `[time]`
    pub time: TimeConfig,
    /// `[network]`
    pub network: NetworkConfig,
}

/// One `[[forward]]` rule: stored objects it matches are queued for a
/// known peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    /// the destination, an AE title from `[[peer]]`
    pub to: String,
    /// only objects sent by these calling AE titles (default: all)
    #[serde(default)]
    pub calling: Vec<String>,
    /// only objects of these modalities (default: all)
    #[serde(default)]
    pub modality: Vec<String>,
    /// ask the destination for storage commitment before an object counts
    /// as delivered
    #[serde(default)]
    pub commit: bool,
}

/// `[retention]`: what may be deleted, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// below this much free space (percent of the store's filesystem),
    /// delete whole studies, least recently received first
    pub keep_free_percent: u8,
    /// also delete studies last received longer ago than this (days)
    #[serde(default)]
    pub max_age_days: Option<u32>,
}

/// One `[[peer]]` entry: a DICOM node we may open associations to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// its AE title (the called AE title we use, and the name a C-MOVE
    /// gives as its Move Destination)
    pub aetitle: String,
    /// host name or address
    pub host: String,
    /// TCP port
    pub port: u16,
    /// connect with DICOM over TLS, presenting `[tls]` key and cert as our
    /// client certificate and verifying the peer against `[tls]` ca_files
    /// and ca_dirs
    #[serde(default)]
    pub tls: bool,
}

/// One `[[allow]]` entry: a calling AE title allowed to associate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// the calling AE title
    pub aetitle: String,
    /// if set, the only address it may call from
    pub host: Option<IpAddr>,
    /// if set, the common name its TLS client certificate must carry
    pub cert_name: Option<String>,
    /// if set, the only services it may use (`store`, `find`, `move`,
    /// `get`; C-ECHO is always allowed); unset: all of them. A presentation
    /// context for another service is refused at negotiation (user
    /// rejection), so that a modality can store without being able to
    /// query, or a viewer query without storing.
    pub services: Option<Vec<Grant>>,
}

/// A service an `[[allow]]` entry may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// C-STORE into the device
    Store,
    /// C-FIND
    Find,
    /// C-MOVE
    Move,
    /// C-GET
    Get,
}

/// The TLS listener (PS3.15 B.9). It runs when both `key` and `cert` are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TCP port for DICOM over TLS (2762 is the registered one).
    pub port: u16,
    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1), e.g. Let's Encrypt `privkey.pem`.
    pub key: Option<PathBuf>,
    /// Certificate chain, leaf first, e.g. Let's Encrypt `fullchain.pem`.
    pub cert: Option<PathBuf>,
    /// CA certificates that client certificates must chain to.
    pub ca_files: Vec<PathBuf>,
    /// Folders of CA certificates (`*.pem`, `*.crt`, `*.cer`).
    pub ca_dirs: Vec<PathBuf>,
    /// Client certificates: "require" (default), "verify" (if sent) or "ignore".
    pub peer_cert: PeerCertPolicy,
    /// "aes" (default) or "chacha20" (boards without AES instructions).
    pub cipher_preference: CipherPreference,
    /// AE title on the TLS port; unset: the same as the plain port's.
    pub aetitle: Option<String>,
    /// Seconds between checks of the certificate files for changes.
    pub reload_check: u64,
}

impl TlsConfig {
    /// The files of the TLS listener, if it is configured.
    pub fn files(&self) -> Option<ServerTlsFiles> {
        Some(ServerTlsFiles {
            key: self.key.clone()?,
            cert: self.cert.clone()?,
            ca_files: self.ca_files.clone(),
            ca_dirs: self.ca_dirs.clone(),
            peer_cert: self.peer_cert,
            cipher_preference: self.cipher_preference,
        })
    }
}

impl Default for Config {
    /// The shipped defaults file: the one place the defaults are written.
    fn default() -> Self {
        // A constant compiled into the binary; the unit test
        // `the_shipped_file_states_every_default` parses it.
        toml::from_str(DEFAULT_TOML).expect("hal-config/minipacs.toml states every key")
    }
}

/// The worker's user when none is configured (made by the package's
/// sysusers.d file).
pub const DEFAULT_USER: &str = "minipacs";

/// The smallest max PDU PS3.8 lets a receiver announce... in practice.
pub const MIN_PDU: u32 = 4096;
/// Our upper bound for the receive buffer of one association.
pub const MAX_PDU: u32 = 16 << 20;

/// One problem with a configuration, located where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// the key at fault, as a TOML key path (`tls.port`, `allow[0].aetitle`)
    pub key: Option<String>,
    /// 1-based line in the file, if the file sets the key
    pub line: Option<usize>,
    /// what is wrong
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.key) {
            (Some(line), Some(key)) => write!(f, "line {line}: {key}: {}", self.message),
            (None, Some(key)) => write!(f, "{key}: {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// the file, when the configuration came from one
    pub source_name: String,
    /// the problems, in file order where known
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: invalid configuration", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// The keys that take effect while serving: a new configuration that
/// changes only these is applied without a restart (`net::apply_live`),
/// and associations in flight keep what they began with. Made only by
/// `Config::split`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    /// `aetitle`
    pub aetitle: String,
    /// `tls.aetitle`
    pub tls_aetitle: Option<String>,
    /// `max_pdu`
    pub max_pdu: u32,
    /// `accept_private_sop_classes`
    pub accept_private_sop_classes: bool,
    /// `max_find_results`
    pub max_find_results: usize,
    /// `allow`
    pub allow: Vec<AllowEntry>,
    /// `peer`
    pub peer: Vec<PeerEntry>,
    /// `forward`
    pub forward: Vec<ForwardRule>,
    /// `retention`
    pub retention: Option<RetentionConfig>,
    /// `commitment_timeout`
    pub commitment_timeout: u64,
    /// `dimse_timeout`
    pub dimse_timeout: u64,
    /// `acse_timeout`
    pub acse_timeout: u64,
    /// `max_associations`
    pub max_associations: usize,
    /// `max_associations_per_peer`
    pub max_associations_per_peer: usize,
    /// `evict_idle_after`
    pub evict_idle_after: u64,
    /// `max_pending_connections`
    pub max_pending_connections: usize,
    /// `shutdown_timeout`
    pub shutdown_timeout: u64,
    /// `layout`
    pub layout: Layout,
    /// `fsync`
    pub fsync: bool,
    /// `overwrite`
    pub overwrite: bool,
    /// `free_space_reserve_percent`
    pub free_space_reserve_percent: u8,
}

/// The keys read once, at start-up (sockets, privileges, folders, TLS
/// files and policy): a change of any of them needs a restart.
#[derive(Debug, Clone, PartialEq)]
struct RestartConfig {
    bind: IpAddr,
    port: u16,
    listen_plain: bool,
    output_directory: PathBuf,
    index_file: PathBuf,
    drop_directory: Option<PathBuf>,
    activity_led: Option<PathBuf>,
    log_directory: PathBuf,
    log_max_bytes: u64,
    user: String,
    group: Option<String>,
    tls_port: u16,
    tls_key: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_ca_files: Vec<PathBuf>,
    tls_ca_dirs: Vec<PathBuf>,
    tls_peer_cert: PeerCertPolicy,
    tls_cipher_preference: CipherPreference,
    tls_reload_check: u64,
}

impl RestartConfig {
    /// The keys that differ from `other`, as they are written in the file.
    #[deny(unused_variables)] // every key is compared
    fn changed(&self, other: &RestartConfig) -> Vec<&'static str> {
        let RestartConfig {
            bind,
            port,
            listen_plain,
            output_directory,
            index_file,
            drop_directory,
            activity_led,
            log_directory,
            log_max_bytes,
            user,
            group,
            tls_port,
            tls_key,
            tls_cert,
            tls_ca_files,
            tls_ca_dirs,
            tls_peer_cert,
            tls_cipher_preference,
            tls_reload_check,
        } = self;
        let mut changed = Vec::new();
        let mut differs = |key, yes: bool| {
            if yes {
                changed.push(key);
            }
        };
        differs("bind", *bind != other.bind);
        differs("port", *port != other.port);
        differs("listen_plain", *listen_plain != other.listen_plain);
        differs(
            "output_directory",
            *output_directory != other.output_directory,
        );
        differs("index_file", *index_file != other.index_file);
        differs("drop_directory", *drop_directory != other.drop_directory);
        differs("activity_led", *activity_led != other.activity_led);
        differs("log_directory", *log_directory != other.log_directory);
        differs("log_max_bytes", *log_max_bytes != other.log_max_bytes);
        differs("user", *user != other.user);
        differs("group", *group != other.group);
        differs("tls.port", *tls_port != other.tls_port);
        differs("tls.key", *tls_key != other.tls_key);
        differs("tls.cert", *tls_cert != other.tls_cert);
        differs("tls.ca_files", *tls_ca_files != other.tls_ca_files);
        differs("tls.ca_dirs", *tls_ca_dirs != other.tls_ca_dirs);
        differs("tls.peer_cert", *tls_peer_cert != other.tls_peer_cert);
        differs(
            "tls.cipher_preference",
            *tls_cipher_preference != other.tls_cipher_preference,
        );
        differs(
            "tls.reload_check",
            *tls_reload_check != other.tls_reload_check,
        );
        changed
    }
}

impl Config {
    /// Parses and validates a TOML text over the defaults (and the board
    /// profile it names); `name` labels errors.
    pub fn from_toml(text: &str, name: &str) -> Result<Config, ConfigError> {
        resolve(Some(FileText { name, text }), toml::Table::new())
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(Some(path), toml::Table::new())
    }

    /// The whole pipeline: defaults, the board profile, the file (if any),
    /// then `overrides` (the command line's options as a table; its lists
    /// add to the file's), validated together.
    pub fn load_with(path: Option<&Path>, overrides: toml::Table) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return resolve(None, overrides);
        };
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                key: None,
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        resolve(
            Some(FileText {
                name: &name,
                text: &text,
            }),
            overrides,
        )
    }

    /// The AE title the plain port (`tls` false) or the TLS port answers to.
    pub fn port_aetitle(&self, tls: bool) -> &str {
        port_aetitle(&self.aetitle, self.tls.aetitle.as_deref(), tls)
    }

    /// What a valid configuration does that its author may not expect,
    /// for `config check` to say.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(retention) = &self.retention {
            if self.forward.is_empty() {
                notes.push(format!(
                    "[retention] without any [[forward]] rule: when free space falls below {} %, \
                     the oldest studies are deleted outright, whether or not they were sent \
                     anywhere",
                    retention.keep_free_percent
                ));
            }
        }
        notes
    }

    /// The keys that apply while serving.
    pub fn live(&self) -> LiveConfig {
        self.split().0
    }

    /// Why going from `self` to `new` needs a restart (the keys that
    /// changed and are read only at start-up), or `None` when it can be
    /// applied while serving. Renewed certificates at the same paths reload
    /// on their own.
    pub fn restart_reason(&self, new: &Config) -> Option<String> {
        let changed = self.split().1.changed(&new.split().1);
        (!changed.is_empty()).then(|| changed.join(", "))
    }

    /// The keys the system applies (`[time]`, `[network]`).
    pub fn system(&self) -> SystemConfig {
        self.split().2
    }

    /// Every key, classified: applied while serving, read at start-up, or
    /// applied by the system. The destructure names every field (no `..`),
    /// so a key added to `Config` or `TlsConfig` does not compile until it
    /// is put here.
    fn split(&self) -> (LiveConfig, RestartConfig, SystemConfig) {
        let Config {
            // No effect of its own: the profile's values are in the other
            // keys (and the running configuration keeps the name for log
            // bundles).
            board: _,
            aetitle,
            bind,
            port,
            output_directory,
            index_file,
            layout,
            fsync,
            overwrite,
            free_space_reserve_percent,
            max_associations,
            max_associations_per_peer,
            evict_idle_after,
            max_pending_connections,
            max_pdu,
            acse_timeout,
            dimse_timeout,
            shutdown_timeout,
            accept_private_sop_classes,
            max_find_results,
            listen_plain,
            drop_directory,
            activity_led,
            log_directory,
            log_max_bytes,
            user,
            group,
            tls:
                TlsConfig {
                    port: tls_port,
                    key: tls_key,
                    cert: tls_cert,
                    ca_files: tls_ca_files,
                    ca_dirs: tls_ca_dirs,
                    peer_cert: tls_peer_cert,
                    cipher_preference: tls_cipher_preference,
                    aetitle: tls_aetitle,
                    reload_check: tls_reload_check,
                },
            allow,
            peer,
            forward,
            commitment_timeout,
            retention,
            time,
            network,
        } = self.clone();
        let live = LiveConfig {
            aetitle,
            tls_aetitle,
            max_pdu,
            accept_private_sop_classes,
            max_find_results,
            allow,
            peer,
            forward,
            retention,
            commitment_timeout,
            dimse_timeout,
            acse_timeout,
            max_associations,
            max_associations_per_peer,
            evict_idle_after,
            max_pending_connections,
            shutdown_timeout,
            layout,
            fsync,
            overwrite,
            free_space_reserve_percent,
        };
        let restart = RestartConfig {
            bind,
            port,
            listen_plain,
            output_directory,
            index_file,
            drop_directory,
            activity_led,
            log_directory,
            log_max_bytes,
            user,
            group,
            tls_port,
            tls_key,
            tls_cert,
            tls_ca_files,
            tls_ca_dirs,
            tls_peer_cert,
            tls_cipher_preference,
            tls_reload_check,
        };
        (live, restart, SystemConfig { time, network })
    }

    /// Every value problem, each with the key path it is about.
    fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| problems.push((key.to_string(), message));
        if let Err(m) = check_ae_title(&self.aetitle) {
            bad("aetitle", m);
        }
        if self.port == 0 {
            bad("port", "must be 1 to 65535".into());
        }
        if self.output_directory.as_os_str().is_empty() {
            bad("output_directory", "must not be empty".into());
        }
        if let Err(m) = check_index_file(&self.index_file) {
            bad("index_file", m);
        }
        if self.free_space_reserve_percent > 90 {
            bad(
                "free_space_reserve_percent",
                format!("{} is over 90", self.free_space_reserve_percent),
            );
        }
        if self.max_associations == 0 || self.max_associations > 1024 {
            bad("max_associations", "must be 1 to 1024".into());
        }
        if self.max_associations_per_peer > self.max_associations {
            bad(
                "max_associations_per_peer",
                format!(
                    "{} is over max_associations ({})",
                    self.max_associations_per_peer, self.max_associations
                ),
            );
        }
        if self.evict_idle_after > 86_400 {
            bad("evict_idle_after", "must be 0 to 86400 seconds".into());
        }
        if self.max_pending_connections == 0 || self.max_pending_connections > 4096 {
            bad("max_pending_connections", "must be 1 to 4096".into());
        }
        if !(MIN_PDU..=MAX_PDU).contains(&self.max_pdu) {
            bad(
                "max_pdu",
                format!("{} is outside {MIN_PDU} to {MAX_PDU}", self.max_pdu),
            );
        }
        for (key, value) in [
            ("acse_timeout", self.acse_timeout),
            ("dimse_timeout", self.dimse_timeout),
        ] {
            if value == 0 || value > 3600 {
                bad(key, format!("{value} s is outside 1 to 3600"));
            }
        }
        if self.shutdown_timeout > 3600 {
            bad("shutdown_timeout", "must be at most 3600 s".into());
        }
        let tls = &self.tls;
        match (&tls.key, &tls.cert) {
            (Some(_), None) => bad("tls.key", "needs tls.cert too, or neither".into()),
            (None, Some(_)) => bad("tls.cert", "needs tls.key too, or neither".into()),
            _ => {}
        }
        let tls_on = tls.key.is_some() && tls.cert.is_some();
        if !self.listen_plain && !tls_on {
            bad(
                "listen_plain",
                "false, and [tls] has no key and cert: nothing to serve".into(),
            );
        }
        if tls_on && self.listen_plain && tls.port == self.port {
            bad(
                "tls.port",
                format!(
                    "plain and TLS listeners both on port {}: give TLS its own port \
                     (--tls-port, tls.port), or serve TLS only on it with --no-plain \
                     (listen_plain = false) and --tls-port {}",
                    self.port, self.port
                ),
            );
        }
        if tls.port == 0 {
            bad("tls.port", "must be 1 to 65535".into());
        }
        if let Some(ae) = &tls.aetitle {
            if let Err(m) = check_ae_title(ae) {
                bad("tls.aetitle", m);
            }
        }
        if !(1 << 20..=1 << 30).contains(&self.log_max_bytes) {
            bad("log_max_bytes", "must be 1 MiB to 1 GiB".into());
        }
        if self.user.is_empty() || self.user == "root" {
            bad("user", "must name an unprivileged user".into());
        }
        for (i, entry) in self.allow.iter().enumerate() {
            if let Err(m) = check_ae_title(&entry.aetitle) {
                bad(&format!("allow.{i}.aetitle"), m);
            }
        }
        for (i, entry) in self.peer.iter().enumerate() {
            if let Err(m) = check_ae_title(&entry.aetitle) {
                bad(&format!("peer.{i}.aetitle"), m);
            }
            if self.peer[..i].iter().any(|p| p.aetitle == entry.aetitle) {
                bad(
                    &format!("peer.{i}.aetitle"),
                    format!("{} is already a [[peer]] above", entry.aetitle),
                );
            }
            if entry.host.trim().is_empty() {
                bad(
                    &format!("peer.{i}.host"),
                    "must name a host or an address".into(),
                );
            }
            if entry.port == 0 {
                bad(&format!("peer.{i}.port"), "must be 1 to 65535".into());
            }
            if entry.tls && (tls.key.is_none() || tls.cert.is_none()) {
                bad(
                    &format!("peer.{i}.tls"),
                    "needs [tls] key and cert (our client certificate)".into(),
                );
            }
        }
        for (i, rule) in self.forward.iter().enumerate() {
            if !self.peer.iter().any(|p| p.aetitle == rule.to) {
                bad(
                    &format!("forward.{i}.to"),
                    format!("{} is not a [[peer]] (add it there first)", rule.to),
                );
            }
            for (j, calling) in rule.calling.iter().enumerate() {
                if let Err(m) = check_ae_title(calling) {
                    bad(&format!("forward.{i}.calling.{j}"), m);
                }
            }
            for (j, modality) in rule.modality.iter().enumerate() {
                let ok = !modality.is_empty()
                    && modality.len() <= 16
                    && modality
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    bad(
                        &format!("forward.{i}.modality.{j}"),
                        format!("{modality:?} is not a modality code (e.g. \"CT\", \"US\")"),
                    );
                }
            }
        }
        if !(10..=86_400).contains(&self.commitment_timeout) {
            bad(
                "commitment_timeout",
                format!("{} s is outside 10 to 86400", self.commitment_timeout),
            );
        }
        if let Some(retention) = &self.retention {
            if retention.keep_free_percent == 0 || retention.keep_free_percent > 90 {
                bad(
                    "retention.keep_free_percent",
                    format!("{} is outside 1 to 90", retention.keep_free_percent),
                );
            } else if retention.keep_free_percent <= self.free_space_reserve_percent {
                bad(
                    "retention.keep_free_percent",
                    format!(
                        "{} is not above free_space_reserve_percent ({}): the reserve would \
                         refuse objects before retention made room",
                        retention.keep_free_percent, self.free_space_reserve_percent
                    ),
                );
            }
            if retention.max_age_days == Some(0) {
                bad(
                    "retention.max_age_days",
                    "must be at least 1 (or left out: no age limit)".into(),
                );
            }
        }
        if tls.reload_check == 0 || tls.reload_check > 3600 {
            bad("tls.reload_check", "must be 1 to 3600 s".into());
        }
        for (i, server) in self.time.ntp.iter().enumerate() {
            if let Err(m) = check_host_name(server) {
                bad(&format!("time.ntp.{i}"), m);
            }
        }
        let network = &self.network;
        match (&network.address, network.gateway) {
            (None, Some(_)) => bad(
                "network.gateway",
                "needs network.address: with DHCP the gateway comes from the DHCP server".into(),
            ),
            (Some(address), Some(gateway)) if !address.contains(gateway) => bad(
                "network.gateway",
                format!("{gateway} is not on {address}'s own network"),
            ),
            (Some(address), _)
                if address.ip.is_loopback()
                    || address.ip.is_multicast()
                    || address.ip.is_unspecified() =>
            {
                bad(
                    "network.address",
                    format!("{} cannot be the device's address", address.ip),
                )
            }
            _ => {}
        }
        if let Some(name) = &network.hostname {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !ok {
                bad(
                    "network.hostname",
                    format!("{name:?} is not a host name (letters, digits and inner hyphens, at most 63)"),
                );
            }
        }
        problems
    }
}

/// Checks a host name or address as a server's name (`[time] ntp`).
fn check_host_name(name: &str) -> Result<(), String> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a host name or an address"))
    }
}

/// Saves a configuration file (the last-good one) durably and atomically,
/// keeping the mode of the file it replaces (the package's 0644: a
/// configuration holds no secret, only the paths of keys, and programs
/// run as the worker's user, such as the updater's store check, read it).
/// A new file gets 0644.
pub fn save_file(path: &Path, bytes: &[u8]) -> Result<(), crate::durable::DurableError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    crate::durable::write_atomically(
        path,
        ".minipacs-save-",
        bytes,
        Some(mode),
        crate::durable::Replace::Allowed,
    )
}

/// The AE title of the plain or the TLS port: the TLS port's own, if set.
fn port_aetitle<'a>(aetitle: &'a str, tls_aetitle: Option<&'a str>, tls: bool) -> &'a str {
    match tls_aetitle {
        Some(tls_ae) if tls => tls_ae,
        _ => aetitle,
    }
}

impl LiveConfig {
    /// The AE title the plain port (`tls` false) or the TLS port answers to.
    pub fn port_aetitle(&self, tls: bool) -> &str {
        port_aetitle(&self.aetitle, self.tls_aetitle.as_deref(), tls)
    }
}

/// The embedded text of the board profile `name`, if there is one.
pub fn board_profile(name: &str) -> Option<&'static str> {
    BOARDS
        .iter()
        .find(|(board, _)| *board == name)
        .map(|(_, text)| *text)
}

/// A board profile as a configuration layer: without the build's keys,
/// and with the TLS keys moved under `[tls]`.
fn board_layer(board: &str) -> Result<toml::Table, String> {
    let text = board_profile(board).ok_or_else(|| {
        let names: Vec<_> = BOARDS.iter().map(|(n, _)| *n).collect();
        format!("unknown board \"{board}\" (known: {})", names.join(", "))
    })?;
    let profile: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("board profile {board}: {}", e.message()))?;
    let mut layer = toml::Table::new();
    let mut tls = toml::Table::new();
    for (key, value) in profile {
        if BOARD_ONLY_KEYS.contains(&key.as_str()) {
            continue;
        }
        if BOARD_TLS_KEYS.contains(&key.as_str()) {
            tls.insert(key, value);
        } else {
            layer.insert(key, value);
        }
    }
    if !tls.is_empty() {
        layer.insert("tls".into(), toml::Value::Table(tls));
    }
    Ok(layer)
}

/// How a layer's lists meet the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lists {
    /// The layer's list replaces the one below (a file says what it means).
    Replace,
    /// The layer's items are added (`--add-cert-file` adds to the file's).
    Extend,
}

/// Lays `over` onto `base`: tables merge key by key, every other value of
/// `over` replaces the one below it (lists as `lists` says).
fn merge(base: &mut toml::Table, over: toml::Table, lists: Lists) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => {
                merge(below, above, lists)
            }
            (Some(toml::Value::Array(below)), toml::Value::Array(above))
                if lists == Lists::Extend =>
            {
                below.extend(above)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The configuration file's text and the name its problems are told under.
struct FileText<'a> {
    name: &'a str,
    text: &'a str,
}

/// One step of a key path: a table's key or an array's index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A dotted key path (`tls.port`, `allow.0.aetitle`) as steps.
fn steps(dotted: &str) -> Vec<Step> {
    dotted
        .split('.')
        .map(|part| match part.parse() {
            Ok(i) => Step::Index(i),
            Err(_) => Step::Key(part.to_string()),
        })
        .collect()
}

/// A key path as TOML writes it: `tls.port`, `allow[0].aetitle`.
fn shown(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Whether `table` has a value at `steps`.
fn has_path(table: &toml::Table, steps: &[Step]) -> bool {
    let Some((Step::Key(first), rest)) = steps.split_first() else {
        return false;
    };
    let mut value = match table.get(first) {
        Some(v) => v,
        None => return false,
    };
    for step in rest {
        let next = match (value, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get(k),
            (toml::Value::Array(a), Step::Index(i)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => value = v,
            None => return false,
        }
    }
    true
}

/// Where the key at `steps` is written in a parsed document: its key's
/// span, or an array item's.
fn span_of(table: &DeTable<'_>, steps: &[Step]) -> Option<Range<usize>> {
    let (Step::Key(first), rest) = steps.split_first()? else {
        return None;
    };
    let (key, value) = table.get_key_value(first.as_str())?;
    if rest.is_empty() {
        return Some(key.span());
    }
    span_in(value, rest)
}

fn span_in(value: &Spanned<DeValue<'_>>, steps: &[Step]) -> Option<Range<usize>> {
    match (value.get_ref(), steps.first()?) {
        (DeValue::Table(t), Step::Key(_)) => span_of(t, steps),
        (DeValue::Array(a), Step::Index(i)) => {
            let item = a.get(*i)?;
            if steps.len() == 1 {
                Some(item.span())
            } else {
                span_in(item, &steps[1..])
            }
        }
        _ => None,
    }
}

/// The layers of one configuration, kept to say where a key came from.
struct Layers<'a> {
    file: Option<(&'a str, Spanned<DeTable<'a>>)>,
    board: Option<(String, toml::Table)>,
    overrides: &'a toml::Table,
}

impl Layers<'_> {
    /// A problem with the key at `steps`, located in the layer that set it:
    /// the file's line, or which other layer it came from.
    fn problem(&self, steps: &[Step], message: String) -> Problem {
        let key = (!steps.is_empty()).then(|| shown(steps));
        if has_path(self.overrides, steps) {
            return Problem {
                key,
                line: None,
                message: format!("{message} (from the command line)"),
            };
        }
        if let Some((text, doc)) = &self.file {
            if let Some(span) = span_of(doc.get_ref(), steps) {
                return Problem {
                    key,
                    line: Some(line_of(text, span.start)),
                    message,
                };
            }
        }
        let message = match &self.board {
            Some((name, table)) if has_path(table, steps) => {
                format!("{message} (from board profile {name})")
            }
            _ => message,
        };
        Problem {
            key,
            line: None,
            message,
        }
    }
}

/// The pipeline: defaults <- board profile <- file <- overrides, merged
/// as tables, deserialized once, validated; every problem located.
fn resolve(file: Option<FileText<'_>>, overrides: toml::Table) -> Result<Config, ConfigError> {
    let source_name = file
        .as_ref()
        .map_or("command line".to_string(), |f| f.name.to_string());
    let fail = |problems: Vec<Problem>| ConfigError {
        source_name: source_name.clone(),
        problems,
    };
    let mut merged: toml::Table = DEFAULT_TOML.parse().map_err(|e: toml::de::Error| {
        fail(vec![Problem {
            key: None,
            line: None,
            message: format!("built-in defaults: {}", e.message()),
        }])
    })?;
    let mut layers = Layers {
        file: None,
        board: None,
        overrides: &overrides,
    };
    let mut file_table = toml::Table::new();
    let mut problems = Vec::new();
    if let Some(file) = &file {
        let syntax = |e: toml::de::Error| {
            fail(vec![Problem {
                key: None,
                line: e.span().map(|s| line_of(file.text, s.start)),
                message: e.message().to_string(),
            }])
        };
        let doc = DeTable::parse(file.text).map_err(syntax)?;
        file_table = toml::Table::deserialize(doc.clone().into_deserializer()).map_err(syntax)?;
        layers.file = Some((file.text, doc));
        // Unknown keys are told (each with its nearest known key) and set
        // aside, so that the rest of the file is checked too.
        for (path, message) in unknown_keys(&file_table) {
            problems.push(layers.problem(&path, message));
            remove_path(&mut file_table, &path);
        }
    }
    let board = [&overrides, &file_table]
        .iter()
        .find_map(|t| t.get("board").and_then(toml::Value::as_str))
        .map(str::to_string);
    if let Some(board) = board {
        let table =
            board_layer(&board).map_err(|m| fail(vec![layers.problem(&steps("board"), m)]))?;
        merge(&mut merged, table.clone(), Lists::Replace);
        layers.board = Some((board, table));
    }
    let defaults = merged.clone();
    merge(&mut merged, file_table, Lists::Replace);
    merge(&mut merged, overrides.clone(), Lists::Extend);

    // A value of the wrong type stops deserialization: tell it, put the
    // default back in its place, and go on, so that every one is told.
    let config = loop {
        match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(merged.clone())) {
            Ok(config) => break Some(config),
            Err(e) => {
                let path: Vec<Step> = e
                    .path()
                    .iter()
                    .filter_map(|segment| match segment {
                        serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                        serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                        _ => None,
                    })
                    .collect();
                problems.push(layers.problem(&path, e.inner().message().to_string()));
                if problems.len() >= MAX_TYPE_PROBLEMS
                    || !restore_default(&mut merged, &defaults, &path)
                {
                    break None;
                }
            }
        }
    };
    if let Some(config) = &config {
        problems.extend(
            config
                .problems()
                .into_iter()
                .map(|(key, message)| layers.problem(&steps(&key), message)),
        );
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(fail(problems))
        }
    }
}

/// Values of the wrong type told in one check, at most (each costs one
/// more deserialization of the whole configuration).
const MAX_TYPE_PROBLEMS: usize = 64;

/// The keys of `file` that no configuration has, each with its problem
/// text: "unknown key", and the known key it most likely meant.
fn unknown_keys(file: &toml::Table) -> Vec<(Vec<Step>, String)> {
    let tables: [(&str, &[&str]); 8] = [
        (
            "",
            serde_aux::serde_introspection::serde_introspect::<Config>(),
        ),
        (
            "tls",
            serde_aux::serde_introspection::serde_introspect::<TlsConfig>(),
        ),
        (
            "allow",
            serde_aux::serde_introspection::serde_introspect::<AllowEntry>(),
        ),
        (
            "peer",
            serde_aux::serde_introspection::serde_introspect::<PeerEntry>(),
        ),
        (
            "forward",
            serde_aux::serde_introspection::serde_introspect::<ForwardRule>(),
        ),
        (
            "retention",
            serde_aux::serde_introspection::serde_introspect::<RetentionConfig>(),
        ),
        (
            "time",
            serde_aux::serde_introspection::serde_introspect::<TimeConfig>(),
        ),
        (
            "network",
            serde_aux::serde_introspection::serde_introspect::<NetworkConfig>(),
        ),
    ];
    let mut found = Vec::new();
    let mut check = |table: &toml::Table, at: Vec<Step>, name: &str| {
        let known = tables
            .iter()
            .find(|(t, _)| *t == name)
            .map_or(&[][..], |(_, k)| *k);
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let mut path = at.clone();
                path.push(Step::Key(key.clone()));
                found.push((path, unknown_key_message(key, name, &tables)));
            }
        }
    };
    check(file, Vec::new(), "");
    for table in ["tls", "retention", "time", "network"] {
        if let Some(toml::Value::Table(t)) = file.get(table) {
            check(t, steps(table), table);
        }
    }
    for array in ["allow", "peer", "forward"] {
        if let Some(toml::Value::Array(entries)) = file.get(array) {
            for (i, entry) in entries.iter().enumerate() {
                if let toml::Value::Table(entry) = entry {
                    check(entry, vec![Step::Key(array.into()), Step::Index(i)], array);
                }
            }
        }
    }
    found
}

/// "unknown key", with a did-you-mean: the nearest known key of the same
/// table, or one of another table (`key` at the top means `tls.key`).
fn unknown_key_message(key: &str, table: &str, tables: &[(&str, &[&str])]) -> String {
    let nearest = tables
        .iter()
        .flat_map(|(t, keys)| keys.iter().map(move |k| (*t, *k)))
        .map(|(t, k)| {
            let distance = strsim::damerau_levenshtein(key, k);
            // A key of this table wins a tie with another table's.
            ((distance, t != table), t, k)
        })
        .min();
    let near_enough = |distance: usize| distance <= (key.chars().count() / 3).max(1);
    match nearest {
        Some(((distance, _), t, k)) if t == table && near_enough(distance) => {
            format!("unknown key; did you mean {k}?")
        }
        Some(((distance, _), t, k)) if near_enough(distance) => {
            let section = match t {
                "" => "the top, before any [section]".to_string(),
                "tls" | "retention" | "time" | "network" => format!("[{t}]"),
                array => format!("[[{array}]]"),
            };
            let shown = if t.is_empty() {
                k.to_string()
            } else {
                format!("{t}.{k}")
            };
            format!("unknown key; did you mean {shown} (it goes under {section})?")
        }
        _ => "unknown key".to_string(),
    }
}

/// The value at `path` in `table`, to change it.
fn value_at_mut<'a>(table: &'a mut toml::Table, path: &[Step]) -> Option<&'a mut toml::Value> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = table.get_mut(first)?;
    for step in rest {
        value = match (value, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get_mut(k)?,
            (toml::Value::Array(a), Step::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// The value at `path` in `table`.
fn value_at<'a>(table: &'a toml::Table, path: &[Step]) -> Option<&'a toml::Value> {
    let (Step::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let mut value = table.get(first)?;
    for step in rest {
        value = match (value, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get(k)?,
            (toml::Value::Array(a), Step::Index(i)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Removes the value at `path` (a table's key; an array's item is left
/// alone, as removing it would renumber the items after it). Whether it
/// was removed.
fn remove_path(table: &mut toml::Table, path: &[Step]) -> bool {
    let Some((Step::Key(last), parent)) = path.split_last() else {
        return false;
    };
    let parent = if parent.is_empty() {
        Some(table)
    } else {
        match value_at_mut(table, parent) {
            Some(toml::Value::Table(t)) => Some(t),
            _ => None,
        }
    };
    parent.is_some_and(|t| t.remove(last).is_some())
}

/// Puts the default value back at `path` in `merged` (or removes the key
/// where there is no default), so that checking can go past a bad value.
/// Whether anything changed (if not, checking cannot go on).
fn restore_default(merged: &mut toml::Table, defaults: &toml::Table, path: &[Step]) -> bool {
    match (value_at(defaults, path), value_at_mut(merged, path)) {
        (Some(default), Some(value)) if default != value => {
            *value = default.clone();
            true
        }
        (Some(_), _) => false,
        (None, _) => remove_path(merged, path),
    }
}

/// Checks `index_file`: a file name, and when relative (to the store's
/// root) one that stays inside the store and is not one of the store's own
/// names (`.incoming`, `.lock`).
pub fn check_index_file(path: &Path) -> Result<(), String> {
    use std::path::Component;
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err("must name a file".into());
    }
    if path.is_absolute() {
        return Ok(());
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "{}: a relative index_file is inside the store: no `..` or `.`",
            path.display()
        ));
    }
    let first = path.components().next().map(|c| c.as_os_str());
    if first == Some(crate::store::INCOMING_DIR.as_ref())
        || first == Some(crate::store::LOCK_FILE.as_ref())
    {
        return Err(format!("{}: that name is the store's own", path.display()));
    }
    Ok(())
}

/// Checks an AE title: 1 to 16 characters of the default repertoire, not
/// all spaces, no backslash or control characters (PS3.5 Table 6.2-1).
pub fn check_ae_title(ae: &str) -> Result<(), String> {
    AeTitle::new(ae).map(drop).map_err(|e| e.to_string())
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_states_every_default() {
        let shipped: Config = toml::from_str(DEFAULT_TOML).expect("every key, nothing unknown");
        assert_eq!(shipped.problems(), Vec::new(), "the defaults are valid");
        let empty = Config::from_toml("", "x.toml").expect("an empty file is the defaults");
        assert_eq!(empty, Config::default());
        assert_eq!(empty.port, 11112);
    }

    #[test]
    fn time_and_network_are_checked_and_change_nothing_in_the_service() {
        let text = "[time]\nntp = [\"ntp.hospital.example\", \"bad name\"]\n\
                    [network]\naddress = \"192.0.2.10/33\"\ngatway = \"192.0.2.1\"\n";
        let err = Config::from_toml(text, "x.toml").expect_err("invalid");
        let shown = err.to_string();
        assert!(
            shown.contains("line 2: time.ntp[1]: \"bad name\" is not a host name"),
            "{shown}"
        );
        assert!(shown.contains("line 4: network.address"), "{shown}");
        assert!(shown.contains("prefix length must be 1 to 32"), "{shown}");
        assert!(
            shown.contains("line 5: network.gatway: unknown key; did you mean gateway?"),
            "{shown}"
        );
        let err = Config::from_toml("[network]\ngateway = \"192.0.2.1\"\n", "x.toml")
            .expect_err("gateway without address");
        assert!(err.to_string().contains("needs network.address"), "{err}");
        let err = Config::from_toml(
            "[network]\naddress = \"192.0.2.10/24\"\ngateway = \"198.51.100.1\"\nhostname = \"-x\"\n",
            "x.toml",
        )
        .expect_err("gateway elsewhere");
        let shown = err.to_string();
        assert!(
            shown.contains("198.51.100.1 is not on 192.0.2.10/24's own network"),
            "{shown}"
        );
        assert!(shown.contains("network.hostname"), "{shown}");
        let fixed = Config::from_toml(
            "[time]\nntp = [\"10.1.2.3\"]\n[network]\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(Config::default().restart_reason(&fixed), None);
        assert_eq!(Config::default().live(), fixed.live());
        assert_ne!(Config::default().system(), fixed.system());
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "port = 0\naetitle = \"THIS-IS-FAR-TOO-LONG\"\nmax_pdu = 12\n";
        let err = Config::from_toml(text, "x.toml").expect_err("invalid");
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(1), Some(2), Some(3)]);
        let shown = err.to_string();
        assert!(shown.contains("line 2: aetitle"), "{shown}");
    }

    #[test]
    fn a_tls_key_is_located_under_tls_not_at_the_top_level_key() {
        let text = "port = 104\naetitle = \"PACS\"\n[tls]\naetitle = \"\"\nport = 0\n";
        let err = Config::from_toml(text, "x.toml").expect_err("tls port 0");
        let found: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_deref(), p.line))
            .collect();
        assert_eq!(
            found,
            vec![(Some("tls.aetitle"), Some(4)), (Some("tls.port"), Some(5))]
        );
        assert!(
            err.to_string().contains("line 5: tls.port: must be"),
            "{err}"
        );
        // A value of the wrong type, and an unknown key, likewise.
        let err =
            Config::from_toml("port = 104\n[tls]\nport = \"x\"\n", "x.toml").expect_err("type");
        assert_eq!(
            (err.problems[0].key.as_deref(), err.problems[0].line),
            (Some("tls.port"), Some(3))
        );
        let err =
            Config::from_toml("port = 104\n[tls]\nprot = 1\n", "x.toml").expect_err("unknown");
        assert_eq!(
            (err.problems[0].key.as_deref(), err.problems[0].line),
            (Some("tls.prot"), Some(3))
        );
        let text = "[[allow]]\naetitle = \"CT1\"\n[[allow]]\naetitle = \"\"\n";
        let err = Config::from_toml(text, "x.toml").expect_err("empty allowed AE");
        assert_eq!(
            (err.problems[0].key.as_deref(), err.problems[0].line),
            (Some("allow[1].aetitle"), Some(4))
        );
    }

    #[test]
    fn the_command_line_is_the_top_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "port = 104\nmax_pdu = 65536\n[tls]\nca_files = [\"/a.pem\"]\n",
        )
        .expect("write");
        let overrides: toml::Table =
            toml::from_str("port = 4242\n[tls]\nca_files = [\"/b.pem\"]\n").expect("table");
        let c = Config::load_with(Some(&path), overrides).expect("valid");
        assert_eq!((c.port, c.max_pdu), (4242, 65536), "the command line wins");
        assert_eq!(
            c.tls.ca_files,
            vec![PathBuf::from("/a.pem"), PathBuf::from("/b.pem")],
            "--add-cert-file adds to the file's"
        );
        let overrides: toml::Table = toml::from_str("max_pdu = 1\n").expect("table");
        let err = Config::load_with(None, overrides).expect_err("bad pdu");
        assert_eq!(err.problems[0].line, None);
        assert!(err.to_string().contains("max_pdu: 1 is outside"), "{err}");
        assert!(err.to_string().contains("(from the command line)"), "{err}");
    }

    #[test]
    fn the_tls_port_may_answer_to_its_own_ae_title() {
        let c = Config::from_toml("aetitle = \"PACS\"\n", "x.toml").expect("valid");
        assert_eq!(
            (c.port_aetitle(false), c.port_aetitle(true)),
            ("PACS", "PACS")
        );
        let c = Config::from_toml(
            "aetitle = \"PACS\"\n[tls]\naetitle = \"SECURE\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(
            (c.port_aetitle(false), c.port_aetitle(true)),
            ("PACS", "SECURE")
        );
        assert_eq!(c.live().port_aetitle(true), "SECURE");
    }

    #[test]
    fn board_profiles_fill_in_and_explicit_keys_win() {
        let c = Config::from_toml("board = \"pi4\"\nmax_pdu = 65536\n", "x.toml").expect("valid");
        assert_eq!(c.max_pdu, 65536, "the explicit key wins");
        assert_eq!(c.tls.cipher_preference, CipherPreference::Chacha20);
        assert_eq!(c.output_directory, PathBuf::from("/var/lib/minipacs/store"));
        assert_eq!(c.free_space_reserve_percent, 10);
        let c = Config::from_toml(
            "board = \"pi4\"\n[tls]\ncipher_preference = \"aes\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(c.tls.cipher_preference, CipherPreference::Aes);
        for (name, _) in BOARDS {
            let c = Config::from_toml(&format!("board = \"{name}\"\n"), "x.toml")
                .expect("every profile loads");
            // What the keeper sends the worker reads back the same.
            let again = toml::to_string(&c).expect("serialize");
            assert_eq!(Config::from_toml(&again, "again").expect("reads back"), c);
        }
        let err =
            Config::from_toml("port = 104\nboard = \"pi9\"\n", "x.toml").expect_err("unknown");
        assert_eq!(err.problems[0].line, Some(2));
        assert!(err.to_string().contains("pi4"), "{err}");
        // A problem with a value the profile set says so (the shipped
        // profiles are valid, so this one is made up).
        let board = board_layer("pi3").expect("profile");
        let layers = Layers {
            file: None,
            board: Some(("pi3".into(), board)),
            overrides: &toml::Table::new(),
        };
        let p = layers.problem(&steps("tls.cipher_preference"), "bad".into());
        assert_eq!(
            p.to_string(),
            "tls.cipher_preference: bad (from board profile pi3)"
        );
    }

    #[test]
    fn every_problem_is_told_at_once_unknown_keys_and_types_included() {
        let text = "aetilte = \"PACS\"\nport = \"104\"\nmax_pdu = 12\nkey = \"/k.pem\"\n\
                    [tls]\nprot = 2762\npeer_cert = 5\nzzzz = 1\n";
        let err = Config::from_toml(text, "x.toml").expect_err("invalid");
        let found: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.line, p.key.as_deref().unwrap_or(""), p.message.as_str()))
            .collect();
        assert_eq!(found.len(), 7, "{err}");
        assert_eq!(
            found[0],
            (Some(1), "aetilte", "unknown key; did you mean aetitle?")
        );
        assert_eq!(found[1].0, Some(2));
        assert_eq!(found[1].1, "port");
        assert!(found[1].2.contains("expected u16"), "{err}");
        assert_eq!(found[2].1, "max_pdu");
        assert_eq!(
            found[3],
            (
                Some(4),
                "key",
                "unknown key; did you mean tls.key (it goes under [tls])?"
            )
        );
        assert_eq!(
            found[4],
            (Some(6), "tls.prot", "unknown key; did you mean port?")
        );
        assert_eq!(found[5].1, "tls.peer_cert");
        assert_eq!(found[6], (Some(8), "tls.zzzz", "unknown key"));
        // An [[allow]] entry's keys are known too.
        let err = Config::from_toml(
            "[[allow]]\naetitle = \"CT1\"\nhots = \"192.0.2.1\"\n",
            "x.toml",
        )
        .expect_err("unknown");
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(
            err.problems[0].to_string(),
            "line 3: allow[0].hots: unknown key; did you mean host?"
        );
    }

    #[test]
    fn index_file_stays_inside_the_store_unless_absolute() {
        let c = Config::from_toml("", "x.toml").expect("defaults");
        assert_eq!(c.index_file, PathBuf::from("index.sqlite"));
        for ok in ["sub/idx.sqlite", "/var/lib/minipacs/index.sqlite"] {
            assert!(Config::from_toml(&format!("index_file = \"{ok}\"\n"), "x.toml").is_ok());
        }
        for bad in ["../index.sqlite", ".lock", ".incoming/x", ""] {
            let err =
                Config::from_toml(&format!("index_file = \"{bad}\"\n"), "x.toml").expect_err(bad);
            assert_eq!(err.problems[0].key.as_deref(), Some("index_file"), "{err}");
            assert_eq!(err.problems[0].line, Some(1), "{err}");
        }
        // Read at start only.
        let other = Config::from_toml("index_file = \"other.sqlite\"\n", "x.toml").expect("ok");
        assert_eq!(c.restart_reason(&other).as_deref(), Some("index_file"));
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_located() {
        let err = Config::from_toml("port = 104\nprot = 5\n", "x.toml").expect_err("unknown key");
        assert_eq!(err.problems[0].line, Some(2));
        let err = Config::from_toml("port = \n", "x.toml").expect_err("bad syntax");
        assert_eq!(err.problems[0].line, Some(1));
        let err = Config::from_toml("layout = \"tree\"\n", "x.toml").expect_err("bad value");
        assert!(err.problems[0].message.contains("flat"), "{err}");
        assert_eq!(err.problems[0].line, Some(1));
    }

    #[test]
    fn live_keys_apply_and_the_others_restart() {
        let running = Config::default();
        let new = Config::from_toml(
            "aetitle = \"BEDSIDE\"\nmax_associations = 4\nboard = \"x86-dev\"\noutput_directory = \"./pacs\"\ndrop_directory = \"./d\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(
            running.restart_reason(&new).as_deref(),
            Some("drop_directory")
        );
        let new = Config {
            drop_directory: None,
            ..new
        };
        assert_eq!(running.restart_reason(&new), None);
        assert_eq!(new.live().aetitle, "BEDSIDE");
        assert_eq!(new.live().max_associations, 4);
        let new = Config {
            port: 104,
            tls: TlsConfig {
                port: 11112,
                ..running.tls.clone()
            },
            ..running.clone()
        };
        assert_eq!(
            running.restart_reason(&new).as_deref(),
            Some("port, tls.port")
        );
    }

    #[test]
    fn peers_are_checked_located_and_applied_live() {
        let text = "[[peer]]\naetitle = \"VIEWER\"\nhost = \"192.0.2.20\"\nport = 11112\n";
        let config = Config::from_toml(text, "x.toml").expect("valid");
        assert_eq!(
            config.peer,
            vec![PeerEntry {
                aetitle: "VIEWER".into(),
                host: "192.0.2.20".into(),
                port: 11112,
                tls: false,
            }]
        );
        let running = Config::from_toml("", "x.toml").expect("defaults");
        assert_eq!(running.restart_reason(&config), None);
        assert_eq!(config.live().peer.len(), 1);

        let text = "[[peer]]\naetitle = \"VIEWER\"\nhost = \"a\"\nport = 1\n\
                    [[peer]]\naetitle = \"VIEWER\"\nhots = \"b\"\nport = 0\ntls = true\n";
        let err = Config::from_toml(text, "x.toml").expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("line 7: peer[1].hots: unknown key; did you mean host?"),
            "{text}"
        );
        let err = Config::from_toml(
            "[[peer]]\naetitle = \"VIEWER\"\nhost = \"a\"\nport = 1\n\
             [[peer]]\naetitle = \"VIEWER\"\nhost = \"\"\nport = 0\ntls = true\n",
            "x.toml",
        )
        .expect_err("invalid");
        let found: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_deref().unwrap_or(""), p.message.as_str()))
            .collect();
        assert!(
            found.contains(&("peer[1].aetitle", "VIEWER is already a [[peer]] above")),
            "{found:?}"
        );
        assert!(
            found.contains(&("peer[1].host", "must name a host or an address")),
            "{found:?}"
        );
        assert!(
            found.contains(&("peer[1].port", "must be 1 to 65535")),
            "{found:?}"
        );
        assert!(
            found.contains(&(
                "peer[1].tls",
                "needs [tls] key and cert (our client certificate)"
            )),
            "{found:?}"
        );
    }
}
