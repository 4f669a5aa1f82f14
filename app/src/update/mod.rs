//! Software updates by drop: a technician puts a signed
//! `minipacs_<version>_<arch>.deb` (and its `.minisig`) in the drop
//! folder; the device installs it if it is signed with the device's update
//! key and newer than what runs, checks the restarted service's health,
//! and reinstalls the previous package (kept on the device) if the check
//! fails. Every outcome goes to a result file beside the drop, the journal
//! and the audit trail. The store is never touched.
//!
//! Why it runs outside the service: installing a package needs root with
//! every capability and a writable /usr, which the service's sandbox
//! (ProtectSystem=strict, a small capability bounding set) rightly never
//! has; and a broken service must not be what stands between the device
//! and the package that fixes it. The image runs `minipacs update apply`
//! from its own unit (image-build/minipacs-update.service: at boot when
//! something waits, and through minipacs-update.path when a package
//! appears), with the same program but none of the service's code paths.
//!
//! The steps, and why in this order:
//! 1. An interrupted earlier attempt (a power cut during dpkg or the
//!    check: [`PENDING`] is still there) is finished first: the previous
//!    package is reinstalled and checked, unless the new one had already
//!    passed (it is then the kept one), and the result says so.
//! 2. Each dropped package, newest first: the signature over its bytes
//!    ([`check::signature`]) before anything parses it; then, from the
//!    signed copy (not the dropped file, which could change), its name,
//!    architecture and version against the installed package
//!    ([`check::package`]); and there must be a kept copy of the installed
//!    version to fall back to. A refusal renames the drop `.rejected`.
//! 3. Accepted: [`PENDING`] is written, the drop removed (so it cannot be
//!    taken again), the result file says INSTALLING; `dpkg -i`; then the
//!    health check ([`health`]): the restarted service READY within a
//!    bound, a C-ECHO to itself, the store readable by the new program,
//!    its `--version`. Passed: the new package becomes the kept one, and
//!    its program the updater the image runs ([`UPDATER`]: a program that
//!    cannot run never becomes the one that must roll it back). Failed:
//!    the kept one is reinstalled and checked.
//!
//! The result file (`<package>.result`) has the drop folder's form
//! ([`crate::drop::write_result`]: verdict, time, why) and is written in a
//! write window ([`crate::write_window`]); the audit record goes through
//! the spool ([`crate::logs::spool`]) to the service, the trail's one
//! writer.

pub mod check;
pub mod system;
pub mod version;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::durable::{self, Replace};
use crate::logs::UpdateRecord;
use check::{Package, Refusal};
use system::System;

/// The device's update key (a minisign public key), put there by the
/// image build.
pub const KEY_FILE: &str = "/usr/share/minipacs/update-key.pub";
/// The updater's own folder: the kept package, the candidate, the pending
/// marker. Root's; the service never sees it.
pub const STATE_DIR: &str = "/var/lib/minipacs-update";
/// A dropped package's file names start so.
pub const DROP_PREFIX: &str = "minipacs_";
/// ... and end so.
pub const DROP_SUFFIX: &str = ".deb";
/// Its signature is `<package>.minisig`.
pub const SIGNATURE_SUFFIX: &str = ".minisig";
/// Its result file is `<package>.result`.
pub const RESULT_SUFFIX: &str = ".result";
/// A refused drop is renamed `<name>.rejected` (like a refused
/// configuration), signature too.
pub const REJECTED_SUFFIX: &str = ".rejected";
/// The copy of the installed package, reinstalled when an update fails.
pub const PREVIOUS: &str = "previous.deb";
/// The signed bytes being installed.
const CANDIDATE: &str = "candidate.deb";
/// The updater the image's unit runs: a copy of the last installed program
/// that passed its health check, so that a package that cannot even run
/// (and a power cut before its rollback) never leaves the device without
/// a working updater.
pub const UPDATER: &str = "updater";
/// Present while an update is between its start and its result.
pub const PENDING: &str = "pending.json";
/// Held while an update runs, so that two never overlap.
const LOCK: &str = "lock";
/// No package is larger (minipacs is a few MB): a larger drop is refused
/// before it is read into memory.
pub const MAX_PACKAGE_BYTES: u64 = 64 << 20;
/// How long the restarted service may take to be READY, by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The health check's C-ECHO is tried this often before it counts as
/// failed (READY means listening; the tries cover a slow first answer).
const ECHO_TRIES: u32 = 3;

/// The first line of a result file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Installed and healthy.
    Installed,
    /// Not installed: unsigned, badly signed, not newer, not for this
    /// device, or unreadable.
    Refused,
    /// Installed, failed its health check, and the previous version is
    /// back.
    RolledBack,
    /// Failed its health check, and reinstalling the previous version
    /// failed too: the device needs attention.
    Failed,
}

impl Verdict {
    /// As the result file says it.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Installed => "INSTALLED",
            Verdict::Refused => "REFUSED",
            Verdict::RolledBack => "ROLLED BACK",
            Verdict::Failed => "FAILED",
        }
    }

    /// As the audit trail says it.
    fn audit(self) -> &'static str {
        match self {
            Verdict::Installed => "installed",
            Verdict::Refused => "refused",
            Verdict::RolledBack => "rolled_back",
            Verdict::Failed => "failed",
        }
    }
}

/// The result file's first line while an update is under way.
pub const INSTALLING: &str = "INSTALLING";

/// What became of one dropped package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// the dropped file's name
    pub package: String,
    /// the verdict
    pub verdict: Verdict,
    /// its version, when it was read
    pub version: Option<String>,
    /// the version installed before
    pub installed_before: Option<String>,
    /// why, or what was checked
    pub detail: String,
}

/// Where things are (the image's paths in production, temp folders in
/// tests) and the health check's bound.
#[derive(Debug, Clone)]
pub struct Settings {
    /// the drop folder
    pub drop_dir: PathBuf,
    /// [`STATE_DIR`]
    pub state_dir: PathBuf,
    /// [`KEY_FILE`]
    pub key_file: PathBuf,
    /// the service's log folder, whose spool takes the audit records
    pub log_dir: PathBuf,
    /// how long the restarted service may take to be READY
    pub ready_timeout: Duration,
    /// the installed program ([`system::PROGRAM`]), copied to [`UPDATER`]
    /// once a new version has passed its health check
    pub program: PathBuf,
}

/// Why an update run could not even look at the drop folder.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A file or folder operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// what was being done
        op: &'static str,
        /// the file or folder
        path: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
    /// Another update is running.
    #[error("another update is running (it holds {})", path.display())]
    Busy {
        /// the lock file
        path: PathBuf,
    },
}

fn io_error<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> UpdateError + 'p {
    move |source| UpdateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The marker of an update under way ([`PENDING`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    /// the dropped file's name
    package: String,
    /// its version
    version: String,
    /// the version it replaces
    installed_before: String,
}

/// Runs an update: finishes an interrupted one, then takes every package
/// in the drop folder, newest first. Returns what became of each.
pub fn apply(settings: &Settings, system: &dyn System) -> Result<Vec<Outcome>, UpdateError> {
    let state = &settings.state_dir;
    fs::create_dir_all(state).map_err(io_error("creating", state))?;
    let lock_path = state.join(LOCK);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("opening", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| UpdateError::Busy {
            path: lock_path.clone(),
        })?;
    let mut outcomes = Vec::new();
    if let Some(outcome) = recover(settings, system) {
        outcomes.push(outcome);
    }
    for name in dropped(&settings.drop_dir)? {
        outcomes.push(take(settings, system, &name));
    }
    if outcomes.is_empty() {
        info!(drop = %settings.drop_dir.display(), "no update in the drop folder");
    }
    Ok(outcomes)
}

/// The packages in the drop folder (`minipacs_*.deb`), newest first by the
/// version in their names (the signed package's own version is what
/// counts later; this is only the order).
pub fn dropped(dir: &Path) -> Result<Vec<String>, UpdateError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("listing", dir)(e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(DROP_PREFIX) && n.ends_with(DROP_SUFFIX))
        .collect();
    let version_of = |name: &str| {
        name[DROP_PREFIX.len()..]
            .split('_')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    names.sort_by(|a, b| version::compare(&version_of(b), &version_of(a)).then_with(|| a.cmp(b)));
    Ok(names)
}

/// Checks `deb`'s signature (`deb.minisig` beside it) with the key in
/// `key_file`: `minipacs update verify`, for whoever signs packages.
pub fn verify_file(deb: &Path, key_file: &Path) -> Result<(), Refusal> {
    let key = read_key(key_file)?;
    let bytes = read_package(deb)?;
    let mut sig_path = deb.as_os_str().to_owned();
    sig_path.push(SIGNATURE_SUFFIX);
    let sig_path = PathBuf::from(sig_path);
    let signature = read_signature(&sig_path)?;
    check::signature(
        &key,
        &bytes,
        signature.as_deref(),
        &sig_path.display().to_string(),
    )
}

fn read_key(path: &Path) -> Result<minisign_verify::PublicKey, Refusal> {
    let text =
        fs::read_to_string(path).map_err(|e| Refusal::NoKey(format!("{}: {e}", path.display())))?;
    check::read_key(&text)
}

/// Reads a package, refusing one larger than [`MAX_PACKAGE_BYTES`].
fn read_package(path: &Path) -> Result<Vec<u8>, Refusal> {
    let unreadable = |e: io::Error| Refusal::Other(format!("cannot read it: {e}"));
    let file = fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_PACKAGE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PACKAGE_BYTES {
        return Err(Refusal::Other(format!(
            "larger than {} MiB: not a minipacs package",
            MAX_PACKAGE_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// The signature file's text, `None` when there is none.
fn read_signature(path: &Path) -> Result<Option<String>, Refusal> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Refusal::UnreadableSignature(format!(
            "{}: {e}",
            path.display()
        ))),
    }
}

/// Takes one dropped package: refuse it, or install it and check.
fn take(settings: &Settings, system: &dyn System, name: &str) -> Outcome {
    info!(package = name, "update dropped: checking it");
    let candidate = settings.state_dir.join(CANDIDATE);
    let (installed, version) = match judge(settings, system, name, &candidate) {
        Ok(accepted) => accepted,
        Err((refusal, version, installed)) => {
            remove_quietly(&candidate);
            let outcome = Outcome {
                package: name.to_string(),
                verdict: Verdict::Refused,
                version,
                installed_before: installed,
                detail: format!("{refusal}; the installed version keeps running"),
            };
            report(settings, &outcome, true);
            return outcome;
        }
    };
    install(settings, system, name, &version, &installed)
}

/// A refusal, with the package's version (if read) and the installed one
/// (if known).
type Refused = (Refusal, Option<String>, Option<String>);

/// Decides whether `name` may be installed; on yes, its signed bytes are
/// in `candidate`, and the installed and new versions are returned.
fn judge(
    settings: &Settings,
    system: &dyn System,
    name: &str,
    candidate: &Path,
) -> Result<(String, String), Refused> {
    let (installed, state) = system.installed().map_err(|e| {
        (
            Refusal::Other(format!("cannot tell what is installed: {e}")),
            None,
            None,
        )
    })?;
    let before = Some(installed.version.clone());
    let refuse = |refusal: Refusal| (refusal, None, before.clone());
    let key = read_key(&settings.key_file).map_err(refuse)?;
    let bytes = read_package(&settings.drop_dir.join(name)).map_err(refuse)?;
    let sig_name = format!("{name}{SIGNATURE_SUFFIX}");
    let signature = read_signature(&settings.drop_dir.join(&sig_name)).map_err(refuse)?;
    check::signature(&key, &bytes, signature.as_deref(), &sig_name).map_err(refuse)?;
    // From here on only the signed copy is looked at.
    durable::write_atomically(
        candidate,
        ".candidate-",
        &bytes,
        Some(0o600),
        Replace::Allowed,
    )
    .map_err(|e| {
        refuse(Refusal::Other(format!(
            "cannot keep a copy to install: {e}"
        )))
    })?;
    drop(bytes);
    let package: Package = system.control(candidate).map_err(|e| {
        refuse(Refusal::Other(format!(
            "signed, but dpkg cannot read it as a package: {e}"
        )))
    })?;
    let with_version = |refusal: Refusal| (refusal, Some(package.version.clone()), before.clone());
    check::package(&package, &installed).map_err(with_version)?;
    if state != "ii" {
        return Err(with_version(Refusal::Other(format!(
            "the installed minipacs {} is not cleanly installed (dpkg state {state:?})",
            installed.version
        ))));
    }
    let previous = settings.state_dir.join(PREVIOUS);
    match system.control(&previous) {
        Ok(kept) if kept.version == installed.version => {}
        Ok(kept) => {
            return Err(with_version(Refusal::Other(format!(
                "the package kept for a rollback ({}) is version {}, not the installed {}: no safe way back",
                previous.display(),
                kept.version,
                installed.version
            ))))
        }
        Err(e) => {
            return Err(with_version(Refusal::Other(format!(
                "no copy of the installed version {} is kept to roll back to ({}: {e})",
                installed.version,
                previous.display()
            ))))
        }
    }
    Ok((installed.version, package.version))
}

/// Installs the accepted candidate, checks, keeps it or rolls back.
fn install(
    settings: &Settings,
    system: &dyn System,
    name: &str,
    version: &str,
    installed: &str,
) -> Outcome {
    let state = &settings.state_dir;
    let pending = Pending {
        package: name.to_string(),
        version: version.to_string(),
        installed_before: installed.to_string(),
    };
    let marker = serde_json::to_vec(&pending).unwrap_or_default();
    if let Err(e) = durable::write_atomically(
        &state.join(PENDING),
        ".pending-",
        &marker,
        Some(0o600),
        Replace::Allowed,
    ) {
        let outcome = Outcome {
            package: name.to_string(),
            verdict: Verdict::Refused,
            version: Some(version.to_string()),
            installed_before: Some(installed.to_string()),
            detail: format!("cannot record the update before starting it: {e}; the installed version keeps running"),
        };
        remove_quietly(&state.join(CANDIDATE));
        report(settings, &outcome, true);
        return outcome;
    }
    {
        let _window = crate::write_window::open();
        crate::drop::write_result(
            &result_path(settings, name),
            INSTALLING,
            &format!(
                "minipacs {version} is being installed over {installed}; do not switch the device off. \
                 This file will say INSTALLED, or ROLLED BACK (with why) if the new version fails its health check"
            ),
        );
        set_aside(&settings.drop_dir, name, None);
    }
    info!(
        package = name,
        version, installed, "installing the update (dpkg -i), then the health check"
    );
    let checked = system
        .install(&state.join(CANDIDATE))
        .map_err(|e| format!("dpkg could not install it: {e}"))
        .and_then(|()| health(system, settings.ready_timeout));
    match checked {
        Ok(evidence) => {
            let kept = durable::sync_dir(state).and_then(|()| {
                fs::rename(state.join(CANDIDATE), state.join(PREVIOUS))
                    .map_err(|e| durable::DurableError::Io {
                        op: "keeping",
                        path: state.join(PREVIOUS),
                        source: e,
                    })
                    .and_then(|()| durable::sync_dir(state))
            });
            if let Err(e) = keep_updater(settings) {
                warn!(error = %e, "cannot keep the new program as the updater; the previous one stays");
            }
            let kept = match kept {
                Ok(()) => format!("{version} is kept on the device for a rollback"),
                Err(e) => {
                    warn!(error = %e, "cannot keep the new package for a later rollback");
                    format!("keeping it for a later rollback failed ({e}): the next update will be refused until this is fixed")
                }
            };
            let outcome = Outcome {
                package: name.to_string(),
                verdict: Verdict::Installed,
                version: Some(version.to_string()),
                installed_before: Some(installed.to_string()),
                detail: format!(
                    "minipacs {version} installed over {installed}; health check passed: {evidence}; {kept}"
                ),
            };
            report(settings, &outcome, false);
            remove_quietly(&state.join(PENDING));
            outcome
        }
        Err(why) => roll_back(settings, system, &pending, &why),
    }
}

/// Reinstalls the kept package after `why`, checks it, reports.
fn roll_back(settings: &Settings, system: &dyn System, pending: &Pending, why: &str) -> Outcome {
    let state = &settings.state_dir;
    let Pending {
        package,
        version,
        installed_before,
    } = pending;
    warn!(
        package,
        version, why, "the update failed: reinstalling {installed_before}"
    );
    let back = system
        .install(&state.join(PREVIOUS))
        .map_err(|e| format!("dpkg could not reinstall it: {e}"))
        .and_then(|()| health(system, settings.ready_timeout));
    remove_quietly(&state.join(CANDIDATE));
    let (verdict, detail) = match back {
        Ok(evidence) => {
            remove_quietly(&state.join(PENDING));
            (
                Verdict::RolledBack,
                format!(
                    "minipacs {version}: {why}; the previous version {installed_before} was reinstalled and passes the health check: {evidence}"
                ),
            )
        }
        // The marker stays: the next start of the updater tries again.
        Err(e) => (
            Verdict::Failed,
            format!(
                "minipacs {version}: {why}; reinstalling the previous version {installed_before} failed too: {e}. \
                 The device needs attention: it tries again at its next start; drop a working signed package, or re-flash the card"
            ),
        ),
    };
    let outcome = Outcome {
        package: package.clone(),
        verdict,
        version: Some(version.clone()),
        installed_before: Some(installed_before.clone()),
        detail,
    };
    report(settings, &outcome, false);
    outcome
}

/// Finishes an update that a power cut or crash interrupted, if there is
/// one: the new package had passed its check if it is already the kept
/// one (only the report was lost); otherwise the kept package is
/// reinstalled.
fn recover(settings: &Settings, system: &dyn System) -> Option<Outcome> {
    let path = settings.state_dir.join(PENDING);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the marker of an interrupted update");
            return None;
        }
    };
    let pending: Pending = match serde_json::from_slice(&text) {
        Ok(pending) => pending,
        // A marker is written atomically: this is not ours to judge, but
        // the safe thing is still the kept package.
        Err(e) => Pending {
            package: "unknown".into(),
            version: format!("(unreadable marker: {e})"),
            installed_before: "the kept version".into(),
        },
    };
    warn!(package = %pending.package, version = %pending.version, "an update was interrupted: finishing it");
    let kept = system
        .control(&settings.state_dir.join(PREVIOUS))
        .map(|p| p.version);
    if kept.as_deref().ok() == Some(pending.version.as_str()) {
        let outcome = Outcome {
            package: pending.package.clone(),
            verdict: Verdict::Installed,
            version: Some(pending.version.clone()),
            installed_before: Some(pending.installed_before.clone()),
            detail: format!(
                "minipacs {} was installed over {} and passed its health check; the device was switched off before this file was written",
                pending.version, pending.installed_before
            ),
        };
        report(settings, &outcome, false);
        remove_quietly(&path);
        return Some(outcome);
    }
    Some(roll_back(
        settings,
        system,
        &pending,
        "the installation was interrupted (the device was switched off or restarted during it)",
    ))
}

/// The health check of the installed version: the restarted service
/// READY within `bound`, a C-ECHO to itself, the store readable by the
/// installed program, and its `--version`. Returns what it saw, or why it
/// failed.
pub fn health(system: &dyn System, bound: Duration) -> Result<String, String> {
    let started = Instant::now();
    system.restart(bound).map_err(|e| {
        format!(
            "the restarted service was not READY within {} s: {e}",
            bound.as_secs()
        )
    })?;
    let ready = started.elapsed();
    let mut tries = 0;
    let echo = loop {
        tries += 1;
        match system.echo() {
            Ok(echo) => break echo,
            Err(e) if tries >= ECHO_TRIES => {
                return Err(format!("the service does not answer: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    let store = system
        .store_readable()
        .map_err(|e| format!("the store cannot be read: {e}"))?;
    let version = system
        .version()
        .map_err(|e| format!("the installed program does not run: {e}"))?;
    info!(
        ready_s = ready.as_secs(),
        echo, store, "health check passed; `minipacs --version`: {version}"
    );
    Ok(format!(
        "READY after {} s, {echo}, {store}, `minipacs --version`: {version}",
        ready.as_secs()
    ))
}

/// Copies the installed program (which has just passed its health check)
/// to [`UPDATER`] in the state folder, atomically.
fn keep_updater(settings: &Settings) -> Result<(), durable::DurableError> {
    let program = fs::read(&settings.program).map_err(|source| durable::DurableError::Io {
        op: "reading",
        path: settings.program.clone(),
        source,
    })?;
    durable::write_atomically(
        &settings.state_dir.join(UPDATER),
        ".updater-",
        &program,
        Some(0o755),
        Replace::Allowed,
    )
}

fn result_path(settings: &Settings, name: &str) -> PathBuf {
    settings.drop_dir.join(format!("{name}{RESULT_SUFFIX}"))
}

/// Renames a dropped package and its signature with `suffix`, or removes
/// them (`None`). Called inside a write window.
fn set_aside(dir: &Path, name: &str, suffix: Option<&str>) {
    for file in [name.to_string(), format!("{name}{SIGNATURE_SUFFIX}")] {
        let path = dir.join(&file);
        let done = match suffix {
            Some(suffix) => fs::rename(&path, dir.join(format!("{file}{suffix}"))),
            None => fs::remove_file(&path),
        };
        match done {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot set the dropped file aside")
            }
        }
    }
}

/// Writes an outcome everywhere it goes: the journal, the result file
/// (and, for a refusal, the drop renamed `.rejected`) in a write window,
/// and the audit spool.
fn report(settings: &Settings, outcome: &Outcome, reject: bool) {
    let Outcome {
        package,
        verdict,
        version,
        installed_before,
        detail,
    } = outcome;
    match verdict {
        Verdict::Installed => info!(package, verdict = verdict.word(), "update: {detail}"),
        _ => warn!(package, verdict = verdict.word(), "update: {detail}"),
    }
    {
        let _window = crate::write_window::open();
        crate::drop::write_result(&result_path(settings, package), verdict.word(), detail);
        if reject {
            set_aside(&settings.drop_dir, package, Some(REJECTED_SUFFIX));
        }
    }
    let record = UpdateRecord {
        time: crate::timestamp::rfc3339(std::time::SystemTime::now()),
        outcome: verdict.audit().to_string(),
        package: package.clone(),
        version: version.clone(),
        installed_before: installed_before.clone(),
        reason: detail.clone(),
    };
    if let Err(e) = crate::logs::spool::submit(&settings.log_dir, &record) {
        warn!(error = %e, "cannot hand the update's outcome to the audit trail");
    }
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(file = %path.display(), error = %e, "cannot remove"),
    }
}

#[cfg(test)]
mod tests {
    use super::check::tests::TestKey;
    use super::system::{parse_control, SystemError};
    use super::*;
    use std::cell::RefCell;

    /// A stand-in for dpkg and systemd. A "package" is a text file of
    /// control fields (what `dpkg-deb -f` would print) and some payload;
    /// installing one makes it the installed package; a version in
    /// `broken` fails the restart (a service that never gets READY).
    struct Fake {
        installed: RefCell<Package>,
        broken: Vec<&'static str>,
        install_fails: Vec<&'static str>,
        calls: RefCell<Vec<String>>,
    }

    impl Fake {
        fn new(version: &str) -> Fake {
            Fake {
                installed: RefCell::new(package(version)),
                broken: Vec::new(),
                install_fails: Vec::new(),
                calls: RefCell::new(Vec::new()),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    fn package(version: &str) -> Package {
        Package {
            name: "minipacs".into(),
            version: version.into(),
            architecture: "arm64".into(),
        }
    }

    fn deb_text(p: &Package) -> String {
        format!(
            "Package: {}\nVersion: {}\nArchitecture: {}\n\nthe program\n",
            p.name, p.version, p.architecture
        )
    }

    impl System for Fake {
        fn installed(&self) -> Result<(Package, String), SystemError> {
            Ok((self.installed.borrow().clone(), "ii".into()))
        }

        fn control(&self, deb: &Path) -> Result<Package, SystemError> {
            let text = fs::read_to_string(deb).map_err(|e| SystemError::Check {
                check: "dpkg-deb",
                detail: e.to_string(),
            })?;
            parse_control(&text).ok_or_else(|| SystemError::Unexpected {
                command: "dpkg-deb".into(),
                output: text,
            })
        }

        fn install(&self, deb: &Path) -> Result<(), SystemError> {
            let p = self.control(deb)?;
            self.calls
                .borrow_mut()
                .push(format!("install {}", p.version));
            if self.install_fails.contains(&p.version.as_str()) {
                return Err(SystemError::Check {
                    check: "dpkg",
                    detail: "broken archive".into(),
                });
            }
            *self.installed.borrow_mut() = p;
            Ok(())
        }

        fn restart(&self, _bound: Duration) -> Result<(), SystemError> {
            let version = self.installed.borrow().version.clone();
            self.calls.borrow_mut().push(format!("restart {version}"));
            if self.broken.contains(&version.as_str()) {
                return Err(SystemError::Check {
                    check: "systemctl restart",
                    detail: "Job for minipacs.service failed".into(),
                });
            }
            Ok(())
        }

        fn version(&self) -> Result<String, SystemError> {
            Ok(format!("minipacs {}", self.installed.borrow().version))
        }

        fn echo(&self) -> Result<String, SystemError> {
            Ok("C-ECHO 127.0.0.1:104 (MINIPACS) status 0000".into())
        }

        fn store_readable(&self) -> Result<String, SystemError> {
            Ok("store readable".into())
        }
    }

    struct Device {
        _dir: tempfile::TempDir,
        settings: Settings,
        key: TestKey,
    }

    /// A device with `installed` installed and kept for a rollback.
    fn device(installed: &str) -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = Settings {
            drop_dir: dir.path().join("drop"),
            state_dir: dir.path().join("state"),
            key_file: dir.path().join("update-key.pub"),
            log_dir: dir.path().join("logs"),
            ready_timeout: Duration::from_secs(5),
            program: dir.path().join("usr-bin-minipacs"),
        };
        fs::write(&settings.program, "#!/bin/sh\n").expect("program");
        for d in [&settings.drop_dir, &settings.state_dir, &settings.log_dir] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let key = TestKey::new();
        fs::write(&settings.key_file, key.public_file()).expect("key");
        fs::write(
            settings.state_dir.join(PREVIOUS),
            deb_text(&package(installed)),
        )
        .expect("previous");
        Device {
            _dir: dir,
            settings,
            key,
        }
    }

    impl Device {
        /// Drops `minipacs_<version>_arm64.deb`, signed unless told not.
        fn drop_package(&self, p: &Package, signed: bool) -> String {
            let name = format!("minipacs_{}_{}.deb", p.version, p.architecture);
            let text = deb_text(p);
            fs::write(self.settings.drop_dir.join(&name), &text).expect("drop");
            if signed {
                fs::write(
                    self.settings
                        .drop_dir
                        .join(format!("{name}{SIGNATURE_SUFFIX}")),
                    self.key.sign(text.as_bytes()),
                )
                .expect("sig");
            }
            name
        }

        fn result(&self, name: &str) -> String {
            fs::read_to_string(result_path(&self.settings, name)).expect("result file")
        }

        fn drop_files(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.settings.drop_dir)
                .expect("drop")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }

        fn kept_version(&self) -> String {
            let text =
                fs::read_to_string(self.settings.state_dir.join(PREVIOUS)).expect("previous");
            parse_control(&text).expect("control").version
        }

        /// The audit records spooled for the service, oldest first.
        fn spooled(&self) -> Vec<UpdateRecord> {
            let dir = self.settings.log_dir.join(crate::logs::spool::SPOOL_DIR);
            let mut paths: Vec<PathBuf> = fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            paths.sort();
            paths
                .iter()
                .map(|p| serde_json::from_slice(&fs::read(p).expect("read")).expect("record"))
                .collect()
        }
    }

    #[test]
    fn a_signed_newer_package_is_installed_checked_and_kept() {
        let d = device("0.1.0");
        let fake = Fake::new("0.1.0");
        let name = d.drop_package(&package("0.1.0+update2"), true);
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].verdict, Verdict::Installed, "{:?}", outcomes[0]);
        assert_eq!(
            fake.calls(),
            ["install 0.1.0+update2", "restart 0.1.0+update2"]
        );
        let result = d.result(&name);
        assert!(result.starts_with("INSTALLED\n"), "{result}");
        assert!(result.contains("installed over 0.1.0"), "{result}");
        assert!(
            result.contains("`minipacs --version`: minipacs 0.1.0+update2"),
            "{result}"
        );
        assert!(result.contains("status 0000"), "{result}");
        // The drop is gone (the package is kept on the device instead).
        assert_eq!(d.drop_files(), [format!("{name}.result")]);
        assert_eq!(d.kept_version(), "0.1.0+update2");
        assert!(!d.settings.state_dir.join(PENDING).exists());
        assert!(!d.settings.state_dir.join(CANDIDATE).exists());
        // The program that passed is the updater from now on.
        assert_eq!(
            fs::read(d.settings.state_dir.join(UPDATER)).expect("updater"),
            fs::read(&d.settings.program).expect("program")
        );
        let records = d.spooled();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].outcome, "installed");
        assert_eq!(records[0].package, name);
        assert_eq!(records[0].version.as_deref(), Some("0.1.0+update2"));
        assert_eq!(records[0].installed_before.as_deref(), Some("0.1.0"));
    }

    #[test]
    fn a_package_failing_its_health_check_is_rolled_back() {
        let d = device("0.1.0");
        let mut fake = Fake::new("0.1.0");
        fake.broken.push("0.1.0+update3");
        let name = d.drop_package(&package("0.1.0+update3"), true);
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(
            outcomes[0].verdict,
            Verdict::RolledBack,
            "{:?}",
            outcomes[0]
        );
        assert_eq!(
            fake.calls(),
            [
                "install 0.1.0+update3",
                "restart 0.1.0+update3",
                "install 0.1.0",
                "restart 0.1.0"
            ]
        );
        assert_eq!(fake.installed.borrow().version, "0.1.0");
        let result = d.result(&name);
        assert!(result.starts_with("ROLLED BACK\n"), "{result}");
        assert!(result.contains("not READY"), "{result}");
        assert!(
            result.contains("Job for minipacs.service failed"),
            "{result}"
        );
        assert!(
            result.contains("previous version 0.1.0 was reinstalled"),
            "{result}"
        );
        assert_eq!(d.kept_version(), "0.1.0");
        assert!(!d.settings.state_dir.join(PENDING).exists());
        assert!(
            !d.settings.state_dir.join(UPDATER).exists(),
            "the failed program is not kept"
        );
        assert_eq!(d.spooled()[0].outcome, "rolled_back");
    }

    #[test]
    fn unsigned_badly_signed_older_and_foreign_packages_are_refused() {
        let d = device("0.2.0");
        let fake = Fake::new("0.2.0");
        let unsigned = d.drop_package(&package("0.3.0"), false);
        let older = d.drop_package(&package("0.1.0"), true);
        let same = d.drop_package(&package("0.2.0"), true);
        let foreign = d.drop_package(
            &Package {
                architecture: "amd64".into(),
                ..package("0.2.1")
            },
            true,
        );
        // Signed by another key.
        let bad = d.drop_package(&package("0.2.5"), false);
        fs::write(
            d.settings.drop_dir.join(format!("{bad}{SIGNATURE_SUFFIX}")),
            TestKey::new().sign(deb_text(&package("0.2.5")).as_bytes()),
        )
        .expect("sig");
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert!(
            fake.calls().is_empty(),
            "nothing installed: {:?}",
            fake.calls()
        );
        assert_eq!(outcomes.len(), 5);
        assert!(
            outcomes.iter().all(|o| o.verdict == Verdict::Refused),
            "{outcomes:?}"
        );
        // Newest first.
        let order: Vec<&str> = outcomes.iter().map(|o| o.package.as_str()).collect();
        assert_eq!(order, [&unsigned, &bad, &foreign, &same, &older]);
        for (name, why) in [
            (&unsigned, "not signed"),
            (&bad, "bad signature"),
            (&foreign, "built for amd64"),
            (&same, "the same as the installed 0.2.0"),
            (&older, "older than the installed 0.2.0"),
        ] {
            let result = d.result(name);
            assert!(result.starts_with("REFUSED\n"), "{result}");
            assert!(result.contains(why), "{name}: {result}");
            assert!(d.drop_files().contains(&format!("{name}{REJECTED_SUFFIX}")));
            assert!(!d.drop_files().contains(name));
        }
        assert!(d
            .drop_files()
            .contains(&format!("{older}{SIGNATURE_SUFFIX}{REJECTED_SUFFIX}")));
        assert_eq!(d.spooled().len(), 5);
        assert!(d.spooled().iter().all(|r| r.outcome == "refused"));
        // A second run finds nothing to do: the drops were set aside.
        assert!(apply(&d.settings, &fake).expect("apply").is_empty());
    }

    #[test]
    fn the_boot_tests_three_drops_in_one_run() {
        let d = device("0.1.0");
        let mut fake = Fake::new("0.1.0");
        fake.broken.push("0.1.0+update3");
        d.drop_package(&package("0.1.0+update2"), true);
        d.drop_package(&package("0.1.0+update3"), true);
        d.drop_package(&package("0.1.0+update4"), false);
        let verdicts: Vec<Verdict> = apply(&d.settings, &fake)
            .expect("apply")
            .iter()
            .map(|o| o.verdict)
            .collect();
        assert_eq!(
            verdicts,
            [Verdict::Refused, Verdict::RolledBack, Verdict::Installed]
        );
        assert_eq!(fake.installed.borrow().version, "0.1.0+update2");
        assert_eq!(d.kept_version(), "0.1.0+update2");
    }

    #[test]
    fn without_a_kept_copy_of_the_installed_version_nothing_is_installed() {
        let d = device("0.1.0");
        let fake = Fake::new("0.1.0");
        fs::remove_file(d.settings.state_dir.join(PREVIOUS)).expect("rm");
        let name = d.drop_package(&package("0.2.0"), true);
        apply(&d.settings, &fake).expect("apply");
        assert!(fake.calls().is_empty());
        let result = d.result(&name);
        assert!(result.starts_with("REFUSED\n"), "{result}");
        assert!(
            result.contains("no copy of the installed version 0.1.0"),
            "{result}"
        );
    }

    #[test]
    fn no_key_on_the_device_refuses_everything() {
        let d = device("0.1.0");
        let fake = Fake::new("0.1.0");
        fs::remove_file(&d.settings.key_file).expect("rm");
        let name = d.drop_package(&package("0.2.0"), true);
        apply(&d.settings, &fake).expect("apply");
        assert!(fake.calls().is_empty());
        assert!(d.result(&name).contains("no update key"));
    }

    /// The marker a power cut during the update from 0.1.0 to 0.2.0 leaves.
    fn interrupted_update_of_0_2_0(d: &Device) {
        let pending = Pending {
            package: "minipacs_0.2.0_arm64.deb".into(),
            version: "0.2.0".into(),
            installed_before: "0.1.0".into(),
        };
        fs::write(
            d.settings.state_dir.join(PENDING),
            serde_json::to_vec(&pending).expect("json"),
        )
        .expect("pending");
    }

    #[test]
    fn an_interrupted_update_is_rolled_back_at_the_next_run() {
        let d = device("0.1.0");
        // The power was cut during dpkg: the new version half in place.
        let fake = Fake::new("0.2.0");
        interrupted_update_of_0_2_0(&d);
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].verdict, Verdict::RolledBack);
        assert_eq!(fake.calls(), ["install 0.1.0", "restart 0.1.0"]);
        let result = d.result("minipacs_0.2.0_arm64.deb");
        assert!(result.starts_with("ROLLED BACK\n"), "{result}");
        assert!(result.contains("interrupted"), "{result}");
        assert!(!d.settings.state_dir.join(PENDING).exists());
    }

    #[test]
    fn an_update_that_had_passed_before_the_cut_is_reported_installed() {
        // The new package is already the kept one: only the report was lost.
        let d = device("0.2.0");
        let fake = Fake::new("0.2.0");
        interrupted_update_of_0_2_0(&d);
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(outcomes[0].verdict, Verdict::Installed);
        assert!(fake.calls().is_empty());
        assert!(!d.settings.state_dir.join(PENDING).exists());
    }

    #[test]
    fn a_failed_rollback_says_so_and_is_tried_again() {
        let d = device("0.1.0");
        let mut fake = Fake::new("0.1.0");
        fake.broken.push("0.2.0");
        fake.install_fails.push("0.1.0");
        let name = d.drop_package(&package("0.2.0"), true);
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(outcomes[0].verdict, Verdict::Failed);
        let result = d.result(&name);
        assert!(result.starts_with("FAILED\n"), "{result}");
        assert!(result.contains("needs attention"), "{result}");
        // The marker stays: the next run tries the rollback again.
        assert!(d.settings.state_dir.join(PENDING).exists());
        fake.install_fails.clear();
        let outcomes = apply(&d.settings, &fake).expect("apply");
        assert_eq!(outcomes[0].verdict, Verdict::RolledBack);
        assert_eq!(fake.installed.borrow().version, "0.1.0");
    }

    #[test]
    fn verify_file_checks_the_signature_beside_a_package() {
        let d = device("0.1.0");
        let name = d.drop_package(&package("0.2.0"), true);
        let deb = d.settings.drop_dir.join(&name);
        assert_eq!(verify_file(&deb, &d.settings.key_file), Ok(()));
        fs::remove_file(
            d.settings
                .drop_dir
                .join(format!("{name}{SIGNATURE_SUFFIX}")),
        )
        .expect("rm");
        assert!(matches!(
            verify_file(&deb, &d.settings.key_file),
            Err(Refusal::Unsigned { .. })
        ));
    }
}
