//! The device's own settings: its NTP servers (`[time]`), its address and
//! host name (`[network]`), applied by root outside the service.
//!
//! The service's sandbox cannot write /etc/systemd nor restart other
//! units, and should not: it faces the network. So the image runs
//! `minipacs system apply` as its own unit (`minipacs-system.service`),
//! at boot before the network and the clock start, and whenever the
//! configuration file changes (`minipacs-system.path`; a drop saves a new
//! last-good file). It writes the system's files ([`render`]) where they
//! differ and restarts only what they belong to, so an address change
//! applies without a reboot and a second run does nothing.
//!
//! A new network setting must prove itself ([`link`]) within
//! [`LINK_CHECK`]; if it does not, the configuration that last worked
//! (kept in the state folder at each success) is put back as the
//! configuration file, its settings applied again, the service restarted
//! on it, and the drop folder's result file says why. A setting that
//! worked once is never rolled back later (a cable pulled at night is not
//! a bad configuration).

pub mod link;
pub mod render;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, SystemConfig};

/// How long a new `[network]` has to show a working link.
pub const LINK_CHECK: Duration = Duration::from_secs(60);

/// The timesyncd drop-in `[time]` writes, under /etc.
const TIMESYNCD_FILE: &str = "systemd/timesyncd.conf.d/50-minipacs-ntp.conf";
/// The networkd file `[network]` writes, under /etc: it sorts before the
/// image's `20-wired.network`, which networkd then ignores.
const NETWORKD_FILE: &str = "systemd/network/10-minipacs.network";
/// The host name file, under /etc.
const HOSTNAME_FILE: &str = "hostname";
/// The configuration whose system settings last worked, in the state folder.
const APPLIED_FILE: &str = "applied.toml";

/// Where the files go: /etc and the state folder on the device, temporary
/// folders in tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// the system's /etc
    pub etc: PathBuf,
    /// where the configuration that last worked is kept
    pub state: PathBuf,
}

impl Paths {
    /// The device's own.
    pub fn device() -> Paths {
        Paths {
            etc: PathBuf::from("/etc"),
            state: PathBuf::from("/var/lib/minipacs-system"),
        }
    }
}

/// What applying needs from the running system: the parts a test replaces.
pub trait Host {
    /// Restarts `unit` if it runs (a unit not yet started at boot reads
    /// the new files when it starts).
    fn try_restart(&mut self, unit: &str) -> Result<(), String>;
    /// Sets the kernel's host name.
    fn set_hostname(&mut self, name: &str) -> Result<(), String>;
    /// Waits until `network` works, for at most `within` ([`link::wait`]).
    fn network_works(&mut self, network: &SystemConfig, within: Duration) -> Result<(), String>;
}

/// The real system: systemctl, sethostname(2), the kernel's view of links.
pub struct Device;

impl Host for Device {
    fn try_restart(&mut self, unit: &str) -> Result<(), String> {
        let status = std::process::Command::new("systemctl")
            .args(["try-restart", unit])
            .status()
            .map_err(|e| format!("systemctl try-restart {unit}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("systemctl try-restart {unit}: {status}"))
        }
    }

    fn set_hostname(&mut self, name: &str) -> Result<(), String> {
        nix::unistd::sethostname(name).map_err(|e| format!("sethostname {name}: {e}"))
    }

    fn network_works(&mut self, system: &SystemConfig, within: Duration) -> Result<(), String> {
        if !link::observable() {
            return Ok(());
        }
        link::wait(&system.network, within)
    }
}

/// What a run did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every file was already as the configuration says.
    Unchanged,
    /// These settings changed and are in force (`time`, `network`,
    /// `hostname`).
    Applied(Vec<&'static str>),
    /// The new network did not work; the configuration that last did is
    /// back (as the configuration file too).
    RolledBack {
        /// what the check found missing
        why: String,
    },
}

/// Why the settings could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// The configuration file is unreadable or invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A file could not be written or removed.
    #[error("{path}: {source}")]
    File {
        /// the file
        path: PathBuf,
        /// the error
        source: std::io::Error,
    },
    /// A file could not be written durably.
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
}

/// What a run did, and what it could not do that did not stop it (a unit
/// not restarted, the host name not set), for the journal.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// what changed
    pub outcome: Outcome,
    /// what went wrong on the way
    pub warnings: Vec<String>,
}

/// Applies the system settings of the configuration file `config` (the
/// last-good one), as the module's doc says.
pub fn apply(config: &Path, paths: &Paths, host: &mut dyn Host) -> Result<Report, SystemError> {
    let mut warnings = Vec::new();
    let outcome = apply_noting(config, paths, host, &mut warnings)?;
    Ok(Report { outcome, warnings })
}

fn apply_noting(
    config: &Path,
    paths: &Paths,
    host: &mut dyn Host,
    warnings: &mut Vec<String>,
) -> Result<Outcome, SystemError> {
    let text = fs::read_to_string(config).map_err(|source| SystemError::File {
        path: config.to_path_buf(),
        source,
    })?;
    let wanted = Config::from_toml(&text, &config.display().to_string())?.system();
    let changed = write_files(&wanted, paths, host, warnings)?;
    let applied = paths.state.join(APPLIED_FILE);
    if changed.contains(&"network") && applied.exists() {
        if let Err(why) = host.network_works(&wanted, LINK_CHECK) {
            roll_back(config, &applied, paths, host, warnings)?;
            return Ok(Outcome::RolledBack { why });
        }
    }
    if fs::read_to_string(&applied).ok().as_deref() != Some(text.as_str()) {
        fs::create_dir_all(&paths.state).map_err(|source| SystemError::File {
            path: paths.state.clone(),
            source,
        })?;
        save(&applied, &text)?;
    }
    Ok(if changed.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Applied(changed)
    })
}

/// Puts the configuration that last worked back in force.
fn roll_back(
    config: &Path,
    applied: &Path,
    paths: &Paths,
    host: &mut dyn Host,
    warnings: &mut Vec<String>,
) -> Result<(), SystemError> {
    let previous = fs::read_to_string(applied).map_err(|source| SystemError::File {
        path: applied.to_path_buf(),
        source,
    })?;
    let system = Config::from_toml(&previous, &applied.display().to_string())?.system();
    crate::config::save_file(config, previous.as_bytes())?;
    write_files(&system, paths, host, warnings)?;
    // The service runs on the file it was given: it must take the old one
    // again (its other keys went back too).
    restart(host, "minipacs.service", warnings);
    Ok(())
}

/// Writes the files for `wanted` where they differ, and restarts what reads
/// them. Returns which settings changed.
fn write_files(
    wanted: &SystemConfig,
    paths: &Paths,
    host: &mut dyn Host,
    warnings: &mut Vec<String>,
) -> Result<Vec<&'static str>, SystemError> {
    let mut changed = Vec::new();
    if put(
        &paths.etc.join(TIMESYNCD_FILE),
        render::timesyncd(&wanted.time),
    )? {
        changed.push("time");
        restart(host, "systemd-timesyncd.service", warnings);
    }
    let hostname = render::hostname(&wanted.network);
    if put(
        &paths.etc.join(HOSTNAME_FILE),
        Some(format!("{hostname}\n")),
    )? {
        changed.push("hostname");
        if let Err(e) = host.set_hostname(hostname) {
            warnings.push(format!("{e} (the name is in force from the next boot)"));
        }
    }
    if put(
        &paths.etc.join(NETWORKD_FILE),
        render::networkd(&wanted.network),
    )? {
        changed.push("network");
        restart(host, "systemd-networkd.service", warnings);
    }
    Ok(changed)
}

fn restart(host: &mut dyn Host, unit: &str, warnings: &mut Vec<String>) {
    if let Err(e) = host.try_restart(unit) {
        warnings.push(e);
    }
}

/// Makes `path` hold `contents` (`None`: not exist). Returns whether it
/// changed.
fn put(path: &Path, contents: Option<String>) -> Result<bool, SystemError> {
    let now = fs::read_to_string(path).ok();
    if now == contents {
        return Ok(false);
    }
    match contents {
        Some(text) => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| SystemError::File {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            save(path, &text)?;
        }
        None => {
            fs::remove_file(path).map_err(|source| SystemError::File {
                path: path.to_path_buf(),
                source,
            })?;
            if let Some(dir) = path.parent() {
                crate::durable::sync_dir(dir)?;
            }
        }
    }
    Ok(true)
}

/// Writes a small text file durably and atomically, readable by all (the
/// system's files are world-readable; the configuration file keeps its
/// folder's protection).
fn save(path: &Path, text: &str) -> Result<(), SystemError> {
    crate::durable::write_atomically(
        path,
        ".minipacs-system-",
        text.as_bytes(),
        Some(0o644),
        crate::durable::Replace::Allowed,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what was asked of the system; the network works or not as
    /// told.
    #[derive(Default)]
    struct Recorded {
        restarted: Vec<String>,
        hostname: Option<String>,
        network_fails: Option<String>,
        checks: usize,
    }

    impl Host for Recorded {
        fn try_restart(&mut self, unit: &str) -> Result<(), String> {
            self.restarted.push(unit.to_string());
            Ok(())
        }
        fn set_hostname(&mut self, name: &str) -> Result<(), String> {
            self.hostname = Some(name.to_string());
            Ok(())
        }
        fn network_works(&mut self, _: &SystemConfig, _: Duration) -> Result<(), String> {
            self.checks += 1;
            self.network_fails.clone().map_or(Ok(()), Err)
        }
    }

    fn setup() -> (tempfile::TempDir, Paths, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths {
            etc: dir.path().join("etc"),
            state: dir.path().join("state"),
        };
        let config = dir.path().join("minipacs.toml");
        (dir, paths, config)
    }

    const STATIC: &str = "[network]\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\nhostname = \"bedside-3\"\n";

    #[test]
    fn first_run_writes_what_differs_and_a_second_does_nothing() {
        let (_dir, paths, config) = setup();
        fs::write(&config, "[time]\nntp = [\"10.1.2.3\"]\n").expect("write");
        let mut host = Recorded::default();
        let outcome = apply(&config, &paths, &mut host).expect("apply").outcome;
        assert_eq!(outcome, Outcome::Applied(vec!["time", "hostname"]));
        assert_eq!(host.restarted, vec!["systemd-timesyncd.service"]);
        assert_eq!(host.hostname.as_deref(), Some("minipacs"));
        let ntp = fs::read_to_string(paths.etc.join(TIMESYNCD_FILE)).expect("drop-in");
        assert!(ntp.ends_with("NTP=10.1.2.3\n"), "{ntp}");
        assert!(!paths.etc.join(NETWORKD_FILE).exists());
        // No check on a first run: nothing to go back to.
        assert_eq!(host.checks, 0);
        let mut again = Recorded::default();
        assert_eq!(
            apply(&config, &paths, &mut again).expect("apply").outcome,
            Outcome::Unchanged
        );
        assert!(again.restarted.is_empty());
    }

    #[test]
    fn a_working_static_address_applies_without_a_reboot() {
        let (_dir, paths, config) = setup();
        fs::write(&config, "").expect("write");
        apply(&config, &paths, &mut Recorded::default()).expect("baseline");
        fs::write(&config, STATIC).expect("write");
        let mut host = Recorded::default();
        let outcome = apply(&config, &paths, &mut host).expect("apply").outcome;
        assert_eq!(outcome, Outcome::Applied(vec!["hostname", "network"]));
        assert_eq!(host.restarted, vec!["systemd-networkd.service"]);
        assert_eq!(host.checks, 1);
        let file = fs::read_to_string(paths.etc.join(NETWORKD_FILE)).expect("network");
        assert!(
            file.contains("Address=192.0.2.10/24\nGateway=192.0.2.1\n"),
            "{file}"
        );
        assert_eq!(
            fs::read_to_string(paths.state.join(APPLIED_FILE)).expect("kept"),
            STATIC
        );
    }

    #[test]
    fn a_network_without_a_link_is_rolled_back_whole() {
        let (_dir, paths, config) = setup();
        let before = "aetitle = \"BEFORE\"\n";
        fs::write(&config, before).expect("write");
        apply(&config, &paths, &mut Recorded::default()).expect("baseline");
        fs::write(&config, format!("aetitle = \"AFTER\"\n{STATIC}")).expect("write");
        let mut host = Recorded {
            network_fails: Some("the gateway 192.0.2.1 does not answer (ARP) on end0".into()),
            ..Recorded::default()
        };
        let outcome = apply(&config, &paths, &mut host).expect("apply").outcome;
        assert_eq!(
            outcome,
            Outcome::RolledBack {
                why: "the gateway 192.0.2.1 does not answer (ARP) on end0".into()
            }
        );
        // The file, the network and the host name are the old ones again,
        // and the service runs on the old file.
        assert_eq!(fs::read_to_string(&config).expect("config"), before);
        assert!(!paths.etc.join(NETWORKD_FILE).exists());
        assert_eq!(
            fs::read_to_string(paths.etc.join(HOSTNAME_FILE)).expect("hostname"),
            "minipacs\n"
        );
        assert_eq!(
            host.restarted,
            vec![
                "systemd-networkd.service",
                "systemd-networkd.service",
                "minipacs.service"
            ]
        );
        // What last worked is still the old one; running again is calm.
        assert_eq!(
            apply(&config, &paths, &mut Recorded::default())
                .expect("again")
                .outcome,
            Outcome::Unchanged
        );
    }
}
