//! Field logs: everything the appliance leaves on disk for the technician
//! who comes to the bedside and collects one bundle.
//!
//! The device runs unattended, so its disk must never fill with logs and a
//! logging failure must never take the receiver down. One concept per part:
//!
//! - [`rotation`]: [`RotatingFile`], one family of files (`name`, `name.1`,
//!   ...) rotated by rename and kept under a byte [`Budget`], counting what
//!   it could not write in [`WriterStats`]. Both logs below are built on it.
//! - [`writer`]: the service log (`minipacs.log`): [`LogDir`], the
//!   synchronous `tracing` writer over a rotating file, and [`ServiceLog`],
//!   the non-blocking front that moves the disk writes off the runtime
//!   threads, so a slow SD card costs log lines, never an association.
//! - [`audit`]: [`Audit`], one JSON line per association, rejection, failed
//!   TLS handshake and object (`audit.jsonl`), synchronous so that it can
//!   be made durable before a sender is told its objects are stored.
//! - [`bundle`]: [`collect_bundle`], one bounded `.tar.gz` with the logs,
//!   the audit trail, the effective configuration, versions, board, disk
//!   and status, plus a `MANIFEST.txt` saying what was cut.
//! - [`redaction`]: the configuration as it goes into the bundle, secrets
//!   replaced.
//! - [`spool`]: audit records from outside the service (the updater),
//!   handed over as files and written to the trail by the service.
//! - [`init`]: process-wide set-up: stderr at once, the file log once the
//!   configuration is known, and [`LogHealth`], the writers' counters for
//!   the status line and the status file.
//!
//! Under systemd the same events also go to journald through stderr; the
//! files are what survives when nobody can read the journal. Writes never
//! panic and never return an error to the caller: a failing disk costs log
//! lines (counted in [`WriterStats`]), not service.

pub mod audit;
pub mod bundle;
pub mod init;
pub mod redaction;
pub mod rotation;
pub mod spool;
pub mod writer;

use std::io;
use std::path::{Path, PathBuf};

pub use audit::{
    AssociationOutcome, AssociationRecord, Audit, DeletionRecord, FindRecord, ForwardRecord,
    ObjectRecord, RejectedRecord, RetrieveRecord, TlsFailedRecord, UpdateRecord,
};
pub use bundle::{collect_bundle, BundleInputs, BundleSummary};
pub use init::{
    attach_file_log, flush_file_log, init_logging, service_log_stats, FileLayer, FileLogHandle,
    LogHealth,
};
pub use rotation::{Budget, RotatingFile, WriterStats};
pub use writer::{LogDir, LogWriter, ServiceLog};

/// The one RFC 3339 formatter, re-exported where callers used to find it.
pub use crate::timestamp::rfc3339;

/// File name of the current service log; rotations append `.1`, `.2`, ...
pub const LOG_FILE: &str = "minipacs.log";
/// File name of the current audit trail; rotations append `.1`, `.2`, ...
pub const AUDIT_FILE: &str = "audit.jsonl";
/// The file the running service keeps its latest status line in.
pub const STATUS_FILE: &str = "status.txt";

/// The privileged keeper's own log (when privileges are separated).
pub const KEEPER_LOG_FILE: &str = "keeper.log";

/// Whether `name` is one of the files the worker writes in the log folder
/// (the service log, the audit trail, their rotations, the status file),
/// so that the keeper can check it may, before it starts one.
pub fn is_worker_file(name: &str) -> bool {
    name == STATUS_FILE
        || rotation::rotation_index(LOG_FILE, name).is_some()
        || rotation::rotation_index(AUDIT_FILE, name).is_some()
}

/// Log files may hold peer addresses and AE titles: owner and group only.
const FILE_MODE: u32 = 0o640;
/// The log folder, likewise.
const DIR_MODE: u32 = 0o750;

/// Why field logging could not be set up or a bundle could not be written.
/// Writing a log line never produces one of these: it counts and drops.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The configured budget cannot be honoured.
    #[error("log budget: {reason}")]
    Budget {
        /// what is wrong with it
        reason: String,
    },
    /// The bundle budget is too small to hold even the small text members.
    #[error("bundle budget of {max_bytes} bytes is below the minimum of {min} bytes")]
    BundleTooSmall {
        /// the budget asked for
        max_bytes: u64,
        /// the smallest budget accepted
        min: u64,
    },
    /// A file or folder operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// what we were doing
        what: &'static str,
        /// the file or folder concerned
        path: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
    /// Writing the bundle durably failed.
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
}

impl LogsError {
    fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> LogsError + 'p {
        move |source| LogsError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Helpers shared by the tests of the parts.
#[cfg(test)]
pub(crate) mod test_util {
    use std::fmt::Write as _;
    use std::fs::{self, File};
    use std::io::{self, BufRead};
    use std::path::{Path, PathBuf};

    /// The files of family `name` in `dir`: (rotation index, path, length).
    pub fn family_files(dir: &Path, name: &str) -> Vec<(u32, PathBuf, u64)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.to_string();
                let index = super::rotation::rotation_index(name, &n)?;
                Some((index, e.path(), e.metadata().ok()?.len()))
            })
            .collect();
        files.sort();
        files
    }

    /// The lines of a text file.
    pub fn lines(path: &Path) -> Vec<String> {
        io::BufReader::new(File::open(path).expect("open"))
            .lines()
            .map(|l| l.expect("line"))
            .collect()
    }

    /// Deterministic, poorly compressible text.
    pub fn noise(seed: &mut u64, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let _ = write!(s, "{:016x}", *seed);
        }
        s.truncate(len);
        s
    }

    /// An object record with the given byte count.
    pub fn object(n: u64) -> super::ObjectRecord<'static> {
        super::ObjectRecord {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_001),
            peer: "[2001:db8::1]:104".parse().expect("addr"),
            calling_ae: "MODALITY",
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid: "1.2.3.4.5",
            bytes: n,
            status: 0xA700,
            milliseconds: 42,
            stored_path: None,
        }
    }
}
