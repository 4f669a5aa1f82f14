//! What an update asks of the system: dpkg (what is installed, what a
//! package is, install one), systemd (restart the service and wait for its
//! READY), and the health checks on the restarted service.
//!
//! One trait, [`System`], so that the update's decisions (refuse, install,
//! keep, roll back, recover) are unit-tested with a stand-in, and
//! [`Debian`] is the thin real thing. Every command runs with a time bound:
//! an update runs unattended, and a hung step must end as a failed check
//! (and a rollback), not as a device that never finishes updating.

use std::io::{self, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::check::Package;
use crate::config::Config;

/// The service an update restarts and checks.
pub const SERVICE: &str = "minipacs.service";
/// The installed program, as the new package puts it.
pub const PROGRAM: &str = "/usr/bin/minipacs";
/// The calling AE title of the health check's C-ECHO (when the
/// configuration's `[[allow]]` list does not name one it can use).
pub const ECHO_CALLING_AE: &str = "MINIPACS-UPDATE";

/// How long dpkg may take to install a package (its maintainer scripts
/// restart the service, which may take a while on a large store).
const DPKG_BOUND: Duration = Duration::from_secs(600);
/// How long a quick command (dpkg-query, dpkg-deb, `--version`) may take.
const QUICK_BOUND: Duration = Duration::from_secs(60);
/// How long the store check may take: opening the index runs SQLite's
/// `quick_check`, seconds per GB of index on a Pi.
const STORE_BOUND: Duration = Duration::from_secs(300);

/// Why a system step failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// The command could not be run at all.
    #[error("{command}: cannot run it: {source}")]
    Spawn {
        /// the command
        command: String,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
    /// The command ran and failed.
    #[error("{command} failed ({status}){}", shown(output))]
    Failed {
        /// the command
        command: String,
        /// its exit status
        status: String,
        /// the end of what it printed
        output: String,
    },
    /// The command did not finish in time (it was killed).
    #[error("{command} did not finish within {} s", bound.as_secs())]
    TimedOut {
        /// the command
        command: String,
        /// its bound
        bound: Duration,
    },
    /// The command's answer made no sense.
    #[error("{command}: unexpected answer {output:?}")]
    Unexpected {
        /// the command
        command: String,
        /// what it printed
        output: String,
    },
    /// A health check failed.
    #[error("{check}: {detail}")]
    Check {
        /// which check
        check: &'static str,
        /// why
        detail: String,
    },
}

fn shown(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// What an update asks of the system. See [`Debian`] for what each does on
/// the device.
pub trait System {
    /// The installed minipacs package, and dpkg's status of it (`ii`
    /// when cleanly installed).
    fn installed(&self) -> Result<(Package, String), SystemError>;
    /// The control fields of a package file.
    fn control(&self, deb: &Path) -> Result<Package, SystemError>;
    /// Installs a package file (upgrade or downgrade), keeping the local
    /// configuration files.
    fn install(&self, deb: &Path) -> Result<(), SystemError>;
    /// Restarts the service and waits, at most `bound`, for it to be
    /// active (READY, for its Type=notify unit).
    fn restart(&self, bound: Duration) -> Result<(), SystemError>;
    /// The installed program's `--version` line.
    fn version(&self) -> Result<String, SystemError>;
    /// A C-ECHO to the service on this machine; says what answered.
    fn echo(&self) -> Result<String, SystemError>;
    /// Whether the installed program can read the store (and its index);
    /// says what it saw.
    fn store_readable(&self) -> Result<String, SystemError>;
}

/// The device: dpkg, systemctl, the C-ECHO from this process, and the
/// installed program reading the store as the store's owner.
#[derive(Debug)]
pub struct Debian {
    /// the service's configuration (port, AE title, store)
    pub config: Config,
    /// where it was read from (handed to the installed program)
    pub config_file: PathBuf,
}

impl System for Debian {
    /// `dpkg-query -W -f '${Version}\t${Architecture}\t${db:Status-Abbrev}' minipacs`
    fn installed(&self) -> Result<(Package, String), SystemError> {
        let mut cmd = Command::new("dpkg-query");
        cmd.args([
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}",
            super::check::PACKAGE,
        ]);
        let out = run(&mut cmd, QUICK_BOUND)?;
        let fields: Vec<&str> = out.trim_end().split('\t').collect();
        match fields.as_slice() {
            [name, version, architecture, state] if !version.is_empty() => Ok((
                Package {
                    name: name.to_string(),
                    version: version.to_string(),
                    architecture: architecture.to_string(),
                },
                state.trim().to_string(),
            )),
            _ => Err(SystemError::Unexpected {
                command: describe(&cmd),
                output: out,
            }),
        }
    }

    /// `dpkg-deb -f DEB Package Version Architecture`
    fn control(&self, deb: &Path) -> Result<Package, SystemError> {
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-f")
            .arg(deb)
            .args(["Package", "Version", "Architecture"]);
        let out = run(&mut cmd, QUICK_BOUND)?;
        parse_control(&out).ok_or_else(|| SystemError::Unexpected {
            command: describe(&cmd),
            output: out,
        })
    }

    /// `dpkg -i --force-confdef --force-confold DEB`, never asking: a
    /// configuration file changed on the device (the image's
    /// minipacs.toml) is kept.
    fn install(&self, deb: &Path) -> Result<(), SystemError> {
        let mut cmd = Command::new("dpkg");
        cmd.args(["-i", "--force-confdef", "--force-confold"])
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd, DPKG_BOUND).map(drop)
    }

    /// `systemctl restart minipacs.service` (which waits for READY or a
    /// failed start), then `systemctl is-active` must say `active`.
    fn restart(&self, bound: Duration) -> Result<(), SystemError> {
        run(Command::new("systemctl").args(["restart", SERVICE]), bound)?;
        let mut cmd = Command::new("systemctl");
        cmd.args(["is-active", SERVICE]);
        let state = run(&mut cmd, QUICK_BOUND)?;
        if state.trim() == "active" {
            Ok(())
        } else {
            Err(SystemError::Unexpected {
                command: describe(&cmd),
                output: state.trim().to_string(),
            })
        }
    }

    /// `/usr/bin/minipacs --version`
    fn version(&self) -> Result<String, SystemError> {
        let out = run(Command::new(PROGRAM).arg("--version"), QUICK_BOUND)?;
        Ok(out.trim().to_string())
    }

    /// A C-ECHO from this process to the plain port on this machine (the
    /// new program may not even run; the check is that the service
    /// answers). With the plain port off, a TCP connection to the TLS port
    /// is what is checked: without a client certificate the TLS port
    /// would refuse an association anyway.
    fn echo(&self) -> Result<String, SystemError> {
        echo(&self.config)
    }

    /// `/usr/bin/minipacs queue status --config FILE`, run as the store's
    /// owner (so nothing in the store becomes root's): the new program
    /// opens the store's index and reads it.
    fn store_readable(&self) -> Result<String, SystemError> {
        let store = &self.config.output_directory;
        let owner = std::fs::metadata(store).map_err(|e| SystemError::Check {
            check: "store",
            detail: format!("{}: {e}", store.display()),
        })?;
        let mut cmd = Command::new(PROGRAM);
        cmd.args(["queue", "--config"])
            .arg(&self.config_file)
            .arg("status")
            .uid(owner.uid())
            .gid(owner.gid())
            .current_dir("/");
        run(&mut cmd, STORE_BOUND)?;
        Ok(format!("store {} readable", store.display()))
    }
}

/// Parses `dpkg-deb -f`'s `Field: value` lines.
pub fn parse_control(text: &str) -> Option<Package> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    Some(Package {
        name: field("Package")?,
        version: field("Version")?,
        architecture: field("Architecture")?,
    })
}

/// The C-ECHO of [`Debian::echo`].
fn echo(config: &Config) -> Result<String, SystemError> {
    let failed = |detail: String| SystemError::Check {
        check: "C-ECHO",
        detail,
    };
    let host = match config.bind {
        std::net::IpAddr::V4(a) if a.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(a) if a.is_unspecified() => "::1".to_string(),
        other => other.to_string(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("starting a runtime: {e}")))?;
    if !config.listen_plain {
        let port = config.tls.port;
        runtime
            .block_on(tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect((host.as_str(), port)),
            ))
            .map_err(|_| failed(format!("no connection to the TLS port {host}:{port}")))?
            .map_err(|e| failed(format!("TLS port {host}:{port}: {e}")))?;
        return Ok(format!(
            "the TLS port {host}:{port} accepts connections (plain DICOM is off: no C-ECHO without a client certificate)"
        ));
    }
    // A calling AE title the [[allow]] list lets in from here, if it has one.
    let calling = config
        .allow
        .iter()
        .find(|a| a.cert_name.is_none() && a.host.is_none_or(|h| h.is_loopback()))
        .map(|a| a.aetitle.clone())
        .unwrap_or_else(|| ECHO_CALLING_AE.to_string());
    let called = config.port_aetitle(false).to_string();
    let peer = crate::send::Peer {
        host: host.clone(),
        port: config.port,
        scu: dimse::scu::ScuOptions {
            calling_ae: calling,
            called_ae: called.clone(),
            timeout: Duration::from_secs(10),
        },
        tls: None,
    };
    let place = format!("{host}:{} ({called})", config.port);
    match runtime.block_on(crate::send::echo(&peer)) {
        Ok(0) => Ok(format!("C-ECHO {place} status 0000")),
        Ok(status) => Err(failed(format!("{place} answered status {status:04X}"))),
        // Turned away by the allowlist: the service negotiated, so it runs.
        Err(e) => match e.downcast_ref::<dimse::scu::ScuError>() {
            Some(dimse::scu::ScuError::Rejected(why)) => Ok(format!(
                "{place} answered the C-ECHO's association with A-ASSOCIATE-RJ ({why}): the service negotiates"
            )),
            _ => Err(failed(format!("{place}: {e:#}"))),
        },
    }
}

/// The command as the log and result file show it.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How much of a failed command's output is kept for the message.
const OUTPUT_TAIL: usize = 600;

/// Runs `cmd` with no input, its output (both streams) into a temporary
/// file (a pipe could fill and stall it while it is waited for), for at
/// most `bound`; kills it when the bound passes. Returns its output when it
/// exits 0.
pub fn run(cmd: &mut Command, bound: Duration) -> Result<String, SystemError> {
    let command = describe(cmd);
    let spawn_error = |source| SystemError::Spawn {
        command: command.clone(),
        source,
    };
    let mut out = tempfile::tempfile().map_err(spawn_error)?;
    let err = out.try_clone().map_err(spawn_error)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(spawn_error)?)
        .stderr(err)
        .spawn()
        .map_err(spawn_error)?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait().map_err(spawn_error)? {
            Some(status) => break status,
            None if started.elapsed() >= bound => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SystemError::TimedOut { command, bound });
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut text = String::new();
    out.rewind()
        .and_then(|()| out.read_to_string(&mut text))
        .map_err(spawn_error)?;
    if status.success() {
        return Ok(text);
    }
    let trimmed = text.trim();
    let tail = match trimmed.char_indices().rev().nth(OUTPUT_TAIL) {
        Some((at, _)) => format!("...{}", &trimmed[at..]),
        None => trimmed.to_string(),
    };
    Err(SystemError::Failed {
        command,
        status: status.to_string(),
        output: tail.replace('\n', " | "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_fields_are_read_from_dpkg_deb_output() {
        let text = "Package: minipacs\nVersion: 0.1.0+update2\nArchitecture: arm64\n";
        assert_eq!(
            parse_control(text),
            Some(Package {
                name: "minipacs".into(),
                version: "0.1.0+update2".into(),
                architecture: "arm64".into(),
            })
        );
        assert_eq!(parse_control("Package: minipacs\n"), None);
    }

    /// Against the real dpkg-deb, where there is one: a package built here
    /// reads back with its fields.
    #[test]
    fn dpkg_deb_reads_a_package_where_there_is_one() {
        if Command::new("dpkg-deb").arg("--version").output().is_err() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
        std::fs::write(
            tree.join("DEBIAN/control"),
            "Package: minipacs\nVersion: 1:0.2.0~rc1-3\nArchitecture: arm64\nMaintainer: t <t@localhost>\nDescription: test\n",
        )
        .expect("control");
        let deb = dir.path().join("p.deb");
        run(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-b"])
                .arg(&tree)
                .arg(&deb),
            QUICK_BOUND,
        )
        .expect("dpkg-deb -b");
        let system = Debian {
            config: Config::default(),
            config_file: PathBuf::from("/nonexistent.toml"),
        };
        assert_eq!(
            system.control(&deb).expect("control"),
            Package {
                name: "minipacs".into(),
                version: "1:0.2.0~rc1-3".into(),
                architecture: "arm64".into(),
            }
        );
    }

    #[test]
    fn commands_are_bounded_and_their_failures_say_why() {
        let out = run(
            Command::new("sh").args(["-c", "echo hi; echo there >&2"]),
            QUICK_BOUND,
        )
        .expect("runs");
        assert_eq!(out, "hi\nthere\n");
        let err = run(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            QUICK_BOUND,
        )
        .expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("exit status: 3") && text.contains("broken"),
            "{text}"
        );
        let started = Instant::now();
        let err =
            run(Command::new("sleep").arg("30"), Duration::from_millis(300)).expect_err("killed");
        assert!(matches!(err, SystemError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // An absent program cannot be run. A Linux kernel says so at the
        // spawn; under qemu-user (CI's aarch64 and armv7 runs) the spawn's
        // vfork is emulated as a fork, and the child's exec failure only
        // shows as glibc's exit status 127. Either way it is an error that
        // names the program.
        let err = run(&mut Command::new("/nonexistent/program"), QUICK_BOUND).expect_err("absent");
        let spawn_refused = matches!(err, SystemError::Spawn { .. });
        let exec_failed_in_child =
            matches!(&err, SystemError::Failed { status, .. } if status.contains("127"));
        assert!(spawn_refused || exec_failed_in_child, "{err}");
        assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    }
}
