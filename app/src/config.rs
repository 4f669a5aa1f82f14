//! The configuration model: one TOML file, every key optional, defaults that
//! run a working receiver, and validation that names the key and line of
//! every problem.
//!
//! The documented default file `hal-config/minipacs.toml` is embedded in the
//! binary and must parse to exactly [`Config::default`] (a unit test holds
//! the two together), so the file a technician reads is the truth.

use dimse::ae::{AeTitle, AeTitleError};
use dimse::negotiation::Allowed;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// The receiver's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// How stored files are named.
    pub layout: Layout,
    /// Make every object durable (fdatasync + folder fsync) before success.
    pub fsync: bool,
    /// Replace an object that has the same SOP Instance UID (default: keep both).
    pub overwrite: bool,
    /// Refuse objects (A700) while free space is below this percentage.
    pub free_space_reserve_percent: u8,
    /// Concurrent associations; one more is answered with A-ASSOCIATE-RJ (transient).
    pub max_associations: usize,
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
    pub allow: Vec<AllowEntry>,
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
}

/// The TLS listener (PS3.15 B.9). It runs when both `key` and `cert` are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            port: 2762,
            key: None,
            cert: None,
            ca_files: Vec::new(),
            ca_dirs: Vec::new(),
            peer_cert: PeerCertPolicy::Require,
            cipher_preference: CipherPreference::Aes,
            aetitle: None,
            reload_check: 5,
        }
    }
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
    fn default() -> Self {
        Config {
            board: None,
            aetitle: "MINIPACS".into(),
            bind: IpAddr::from([0, 0, 0, 0]),
            port: 11112,
            output_directory: PathBuf::from("./pacs"),
            layout: Layout::Flat,
            fsync: true,
            overwrite: false,
            free_space_reserve_percent: 5,
            max_associations: 16,
            max_pending_connections: 64,
            max_pdu: 262_144,
            acse_timeout: 30,
            dimse_timeout: 60,
            shutdown_timeout: 10,
            accept_private_sop_classes: true,
            listen_plain: true,
            drop_directory: None,
            activity_led: None,
            log_directory: PathBuf::from("./minipacs-logs"),
            log_max_bytes: 20 << 20,
            user: DEFAULT_USER.into(),
            group: None,
            tls: TlsConfig::default(),
            allow: Vec::new(),
        }
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
    /// the key at fault, if known
    pub key: Option<String>,
    /// 1-based line in the file, if known
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

impl Config {
    /// Parses and validates a TOML text; `name` labels errors.
    pub fn from_toml(text: &str, name: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: name.to_string(),
            problems: vec![Problem {
                key: None,
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().to_string(),
            }],
        })?;
        let config = match &config.board {
            Some(board) => with_board(text, board).map_err(|message| ConfigError {
                source_name: name.to_string(),
                problems: vec![Problem {
                    key: Some("board".into()),
                    line: line_of_key(text, "board"),
                    message,
                }],
            })?,
            None => config,
        };
        config.validate_in(text, name)?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                key: None,
                line: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::from_toml(&text, &name)
    }

    /// The AE title the plain port (`tls` false) or the TLS port answers
    /// to, as the protocol's type (an error only for an unvalidated file).
    pub fn port_ae(&self, tls: bool) -> Result<AeTitle, AeTitleError> {
        AeTitle::new(self.port_aetitle(tls))
    }

    /// The calling-AE allowlist as the protocol's negotiation takes it
    /// (an error only for an unvalidated file).
    pub fn allowlist(&self) -> Result<Vec<Allowed>, AeTitleError> {
        self.allow
            .iter()
            .map(|a| {
                Ok(Allowed {
                    aetitle: AeTitle::new(&a.aetitle)?,
                    host: a.host,
                    cert_name: a.cert_name.clone(),
                })
            })
            .collect()
    }

    /// The AE title the plain port (`tls` false) or the TLS port answers to.
    pub fn port_aetitle(&self, tls: bool) -> &str {
        match &self.tls.aetitle {
            Some(tls_ae) if tls => tls_ae,
            _ => &self.aetitle,
        }
    }

    /// Why going from `self` to `new` needs a restart, or `None` when it
    /// can be applied while serving (AE titles, negotiation, limits,
    /// timeouts, storage options; renewed certificates reload on their own).
    pub fn restart_reason(&self, new: &Config) -> Option<&'static str> {
        let (a, b) = (self, new);
        if (a.bind, a.port, a.listen_plain) != (b.bind, b.port, b.listen_plain) {
            return Some("listening address or port");
        }
        if a.tls.port != b.tls.port || a.tls.files().is_some() != b.tls.files().is_some() {
            return Some("TLS port, or TLS switched on or off");
        }
        if a.tls.files() != b.tls.files() || a.tls.reload_check != b.tls.reload_check {
            // Renewed certificates at the same paths reload without a
            // restart; other files or another policy restart.
            return Some("TLS files or policy");
        }
        if (&a.user, &a.group) != (&b.user, &b.group) {
            return Some("worker user or group");
        }
        if a.output_directory != b.output_directory {
            return Some("store folder");
        }
        if (&a.log_directory, a.log_max_bytes, &a.drop_directory)
            != (&b.log_directory, b.log_max_bytes, &b.drop_directory)
        {
            return Some("log or drop folder");
        }
        if a.activity_led != b.activity_led {
            return Some("activity LED");
        }
        None
    }

    /// Validates values (after command-line overrides, too).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_in("", "configuration")
    }

    fn validate_in(&self, text: &str, name: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: Some(key.to_string()),
                line: line_of_key(text, key),
                message,
            })
        };
        if let Err(m) = check_ae_title(&self.aetitle) {
            bad("aetitle", m);
        }
        if self.port == 0 {
            bad("port", "must be 1 to 65535".into());
        }
        if self.output_directory.as_os_str().is_empty() {
            bad("output_directory", "must not be empty".into());
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
        if tls.key.is_some() != tls.cert.is_some() {
            bad("key", "[tls] needs both key and cert, or neither".into());
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
                "port",
                format!("plain and TLS listeners both on port {}", self.port),
            );
        }
        if tls.port == 0 {
            bad("port", "[tls] port must be 1 to 65535".into());
        }
        if let Some(ae) = &tls.aetitle {
            if let Err(m) = check_ae_title(ae) {
                bad("aetitle", format!("[tls] {m}"));
            }
        }
        if !(1 << 20..=1 << 30).contains(&self.log_max_bytes) {
            bad("log_max_bytes", "must be 1 MiB to 1 GiB".into());
        }
        if self.user.is_empty() || self.user == "root" {
            bad("user", "must name an unprivileged user".into());
        }
        for entry in &self.allow {
            if let Err(m) = check_ae_title(&entry.aetitle) {
                bad("aetitle", format!("[[allow]] {m}"));
            }
        }
        if tls.reload_check == 0 || tls.reload_check > 3600 {
            bad("reload_check", "must be 1 to 3600 s".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(ConfigError {
                source_name: name.to_string(),
                problems,
            })
        }
    }
}

/// The embedded text of the board profile `name`, if there is one.
pub fn board_profile(name: &str) -> Option<&'static str> {
    BOARDS
        .iter()
        .find(|(board, _)| *board == name)
        .map(|(_, text)| *text)
}

/// The configuration in `text` with the board profile's values filled in
/// for every key the text does not set.
fn with_board(text: &str, board: &str) -> Result<Config, String> {
    let profile = board_profile(board).ok_or_else(|| {
        let names: Vec<_> = BOARDS.iter().map(|(n, _)| *n).collect();
        format!("unknown board \"{board}\" (known: {})", names.join(", "))
    })?;
    let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let profile: toml::Table =
        toml::from_str(profile).map_err(|e| format!("board profile {board}: {e}"))?;
    for (key, value) in profile {
        if BOARD_ONLY_KEYS.contains(&key.as_str()) {
            continue;
        }
        if key == "cipher_preference" {
            let tls = table
                .entry("tls")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(tls) = tls.as_table_mut() {
                tls.entry(key).or_insert(value);
            }
            continue;
        }
        table.entry(key).or_insert(value);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("board profile {board}: {}", e.message()))
}

/// Checks an AE title: 1 to 16 characters of the default repertoire, not
/// all spaces, no backslash or control characters (PS3.5 Table 6.2-1).
pub fn check_ae_title(ae: &str) -> Result<(), String> {
    AeTitle::new(ae).map(drop).map_err(|e| e.to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_default() {
        let parsed = Config::from_toml(DEFAULT_TOML, "minipacs.toml").expect("valid");
        assert_eq!(parsed, Config::default());
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
    }

    #[test]
    fn board_profiles_fill_in_and_explicit_keys_win() {
        let c = Config::from_toml("board = \"pi4\"\nmax_pdu = 65536\n", "x.toml").expect("valid");
        assert_eq!(c.max_pdu, 65536, "the explicit key wins");
        assert_eq!(c.tls.cipher_preference, CipherPreference::Chacha20);
        assert_eq!(c.output_directory, PathBuf::from("/var/lib/minipacs/store"));
        assert_eq!(c.free_space_reserve_percent, 10);
        for (name, _) in BOARDS {
            Config::from_toml(&format!("board = \"{name}\"\n"), "x.toml")
                .expect("every profile loads");
        }
        let err =
            Config::from_toml("port = 104\nboard = \"pi9\"\n", "x.toml").expect_err("unknown");
        assert_eq!(err.problems[0].line, Some(2));
        assert!(err.to_string().contains("pi4"), "{err}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_located() {
        let err = Config::from_toml("port = 104\nprot = 5\n", "x.toml").expect_err("unknown key");
        assert_eq!(err.problems[0].line, Some(2));
        let err = Config::from_toml("port = \n", "x.toml").expect_err("bad syntax");
        assert_eq!(err.problems[0].line, Some(1));
        let err = Config::from_toml("layout = \"tree\"\n", "x.toml").expect_err("bad value");
        assert!(err.problems[0].message.contains("flat"), "{err}");
    }
}
