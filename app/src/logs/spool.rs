//! The audit spool: audit records from outside the service.
//!
//! The updater (`minipacs update apply`) runs as root outside the
//! service's sandbox, and its outcomes belong in the audit trail. The
//! trail has one writer, the service's worker ([`super::Audit`]: it
//! rotates the file and keeps its byte budget, which a second writer
//! appending behind its back would break). So the updater leaves each
//! record as a small file in `<log folder>/audit-spool/` ([`submit`]),
//! and the worker, every few seconds and at its start, writes what it
//! finds there to the trail, syncs it, and removes the files ([`Spool`]).
//! A record left while the service is down (an update rolled back) is
//! written when it is up again.
//!
//! The folder is made setgid and group-writable with the log folder's
//! group (the worker's), so the worker can read and remove what root
//! leaves there.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::OFlag;
use tracing::{info, warn};

use super::audit::UpdateRecord;
use super::{Audit, LogsError};
use crate::dirfd::Folder;

/// The spool's folder, inside the log folder.
pub const SPOOL_DIR: &str = "audit-spool";
/// Spooled records end so; anything else (temp files) is left alone.
const SUFFIX: &str = ".json";
/// What an unreadable record is renamed to end with, so it is read once.
const UNREADABLE_SUFFIX: &str = ".unreadable";
/// No record is larger (a reason is a few lines).
const MAX_RECORD: u64 = 64 << 10;
/// setgid, group-writable: see the module's doc.
const SPOOL_MODE: u32 = 0o2770;

/// Leaves `record` in the spool of the log folder `log_dir`, durably
/// (the updater's side). Returns the file written.
pub fn submit(log_dir: &Path, record: &UpdateRecord) -> Result<PathBuf, LogsError> {
    let dir = log_dir.join(SPOOL_DIR);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(LogsError::io("creating", &dir))?;
        // The log folder's group (the worker's) and the mode, whatever
        // the umask.
        let group = std::fs::metadata(log_dir)
            .map_err(LogsError::io("looking at", log_dir))?
            .gid();
        std::os::unix::fs::chown(&dir, None, Some(group))
            .map_err(LogsError::io("giving the worker's group", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(SPOOL_MODE))
            .map_err(LogsError::io("setting permissions of", &dir))?;
    }
    let line = serde_json::to_vec(record).map_err(|e| LogsError::Io {
        what: "encoding",
        path: dir.clone(),
        source: std::io::Error::other(e),
    })?;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let path = dir.join(format!(
        "{millis:020}-{}-{:08x}{SUFFIX}",
        std::process::id(),
        fastrand::u32(..)
    ));
    crate::durable::write_atomically(
        &path,
        ".spool-",
        &line,
        Some(0o640),
        crate::durable::Replace::Never,
    )?;
    Ok(path)
}

/// The worker's side: writes spooled records to the trail.
#[derive(Debug, Default)]
pub struct Spool {
    /// Records written but whose file could not be removed: not written
    /// again while this process runs.
    written: Mutex<HashSet<OsString>>,
}

impl Spool {
    /// Writes every record in the spool of the log folder `logs` to
    /// `audit`, oldest first, syncs the trail, then removes their files.
    /// Returns how many it wrote. Never fails: a problem is logged, and
    /// what is left is tried again next time.
    pub fn drain(&self, logs: &Folder, audit: &Audit) -> usize {
        let spool = match logs.open_dir(SPOOL_DIR) {
            Ok(spool) => spool,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(dir = %logs.display_path(SPOOL_DIR).display(), error = %e, "cannot open the audit spool");
                return 0;
            }
        };
        let mut names: Vec<OsString> = match spool.entries() {
            Ok(entries) => entries
                .into_iter()
                .filter(|e| e.is_file && e.name.to_string_lossy().ends_with(SUFFIX))
                .map(|e| e.name)
                .collect(),
            Err(e) => {
                warn!(dir = %spool.path().display(), error = %e, "cannot list the audit spool");
                return 0;
            }
        };
        names.sort();
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let mut done = Vec::new();
        for name in names {
            if written.contains(&name) {
                continue;
            }
            match read_record(&spool, &name) {
                Ok(record) => {
                    if audit.update(&record) {
                        info!(outcome = %record.outcome, package = %record.package,
                            "update outcome written to the audit trail");
                        done.push(name);
                    }
                }
                Err(why) => {
                    warn!(file = %spool.display_path(&name).display(), why, "unreadable audit spool record; set aside");
                    let mut aside = name.clone();
                    aside.push(UNREADABLE_SUFFIX);
                    let _ = spool.rename(&name, &spool, &aside, true);
                }
            }
        }
        if done.is_empty() {
            return 0;
        }
        audit.sync();
        for name in &done {
            if let Err(e) = spool.remove_file(name) {
                warn!(file = %spool.display_path(name).display(), error = %e,
                    "cannot remove a spooled record already in the audit trail");
                written.insert(name.clone());
            }
        }
        let _ = spool.sync();
        done.len()
    }
}

fn read_record(spool: &Folder, name: &OsString) -> Result<UpdateRecord, String> {
    let file = spool
        .open_file(name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)
        .map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_RECORD + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_RECORD {
        return Err(format!("larger than {MAX_RECORD} bytes"));
    }
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::test_util::lines;
    use crate::logs::{Budget, AUDIT_FILE};

    fn record(outcome: &str) -> UpdateRecord {
        UpdateRecord {
            time: "2026-01-31T12:00:00.000Z".into(),
            outcome: outcome.into(),
            package: "minipacs_0.2.0_arm64.deb".into(),
            version: Some("0.2.0".into()),
            installed_before: Some("0.1.0".into()),
            reason: "health check passed".into(),
        }
    }

    #[test]
    fn spooled_records_reach_the_trail_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open(dir.path(), Budget::default()).expect("audit");
        let logs = Folder::open(dir.path()).expect("folder");
        let spool = Spool::default();
        assert_eq!(spool.drain(&logs, &audit), 0, "no spool folder yet");
        submit(dir.path(), &record("refused")).expect("submit");
        submit(dir.path(), &record("installed")).expect("submit");
        let mode = std::fs::metadata(dir.path().join(SPOOL_DIR))
            .expect("spool")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, SPOOL_MODE);
        assert_eq!(spool.drain(&logs, &audit), 2);
        assert_eq!(spool.drain(&logs, &audit), 0, "written once");
        let got: Vec<serde_json::Value> = lines(&dir.path().join(AUDIT_FILE))
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["event"], "update");
        assert_eq!(got[0]["outcome"], "refused");
        assert_eq!(got[1]["outcome"], "installed");
        assert_eq!(got[1]["version"], "0.2.0");
        assert_eq!(got[1]["installed_before"], "0.1.0");
        let left: Vec<_> = std::fs::read_dir(dir.path().join(SPOOL_DIR))
            .expect("spool")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn an_unreadable_record_is_set_aside_not_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open(dir.path(), Budget::default()).expect("audit");
        let logs = Folder::open(dir.path()).expect("folder");
        submit(dir.path(), &record("installed")).expect("submit");
        std::fs::write(dir.path().join(SPOOL_DIR).join("0-bad.json"), "{").expect("write");
        let spool = Spool::default();
        assert_eq!(spool.drain(&logs, &audit), 1);
        assert!(dir
            .path()
            .join(SPOOL_DIR)
            .join("0-bad.json.unreadable")
            .exists());
        assert_eq!(spool.drain(&logs, &audit), 0);
        assert_eq!(lines(&dir.path().join(AUDIT_FILE)).len(), 1);
    }
}
