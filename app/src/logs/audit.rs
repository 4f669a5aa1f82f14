//! The audit trail (`audit.jsonl`): one JSON line per association, per
//! refused connection (A-ASSOCIATE-RJ, failed TLS handshake), per object
//! and per query (C-FIND),
//! so "was this study received, from whom, and where is it" and "who tried
//! to send and was turned away, why" have a durable answer.
//!
//! Unlike the service log it is written synchronously: [`Audit::sync`] is
//! called before an association's A-RELEASE-RP when durability is on, and
//! it can only make durable what has already reached the file.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize, Serializer};

use super::rotation::{lock, Budget, RotatingFile, WriterStats};
use super::{LogsError, AUDIT_FILE};
use crate::timestamp::rfc3339;

/// How an association ended, as recorded in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationOutcome {
    /// Orderly A-RELEASE.
    Released,
    /// We answered the request with A-ASSOCIATE-RJ.
    Rejected,
    /// The peer sent A-ABORT.
    AbortedByPeer,
    /// We sent A-ABORT (protocol error, shutdown, ...).
    Aborted,
    /// A timer expired (ARTIM, idle, or a stalled transfer).
    TimedOut,
    /// Stopped between messages to make room for a new association, after
    /// being idle longest with every slot taken.
    Evicted,
    /// The connection closed or failed without a release.
    ConnectionLost,
    /// The TLS handshake failed; no association was negotiated.
    TlsFailed,
}

/// One association, written when it ends. Borrowed so the caller can record
/// straight from its own state without allocating.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "association")]
pub struct AssociationRecord<'a> {
    /// When the association started (the connection was accepted).
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title (empty if the request never arrived).
    pub calling_ae: &'a str,
    /// Called AE title (empty if the request never arrived).
    pub called_ae: &'a str,
    /// Negotiated TLS version, e.g. "TLSv1.3"; null on the plain port.
    pub tls_version: Option<&'a str>,
    /// Negotiated cipher suite; null on the plain port.
    pub tls_suite: Option<&'a str>,
    /// Subject of the peer's TLS client certificate, if it sent one.
    pub tls_peer_subject: Option<&'a str>,
    /// How it ended.
    pub outcome: AssociationOutcome,
    /// Objects stored durably.
    pub objects_stored: u64,
    /// Objects answered with a failure status.
    pub objects_failed: u64,
    /// Bytes received (PDU payload).
    pub bytes: u64,
    /// Duration in seconds (millisecond precision in the file).
    #[serde(serialize_with = "ser_seconds")]
    pub seconds: f64,
}

/// One C-STORE, written when its response is sent.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "object")]
pub struct ObjectRecord<'a> {
    /// When the response was sent.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title of the association.
    pub calling_ae: &'a str,
    /// Affected SOP Class UID.
    pub sop_class_uid: &'a str,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: &'a str,
    /// Data set bytes received.
    pub bytes: u64,
    /// DIMSE status sent back, written as 4 hex digits ("0000", "A700").
    #[serde(serialize_with = "ser_status")]
    pub status: u16,
    /// Time from the first fragment to the response.
    pub milliseconds: u64,
    /// Where the object was stored; null if it was not.
    #[serde(serialize_with = "ser_opt_path")]
    pub stored_path: Option<&'a Path>,
}

/// One C-FIND, written when its final response is sent: who asked what,
/// how many matches were answered, and how it ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "find")]
pub struct FindRecord<'a> {
    /// When the final response was sent.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title of the association.
    pub calling_ae: &'a str,
    /// The information model (Affected SOP Class UID).
    pub sop_class_uid: &'a str,
    /// The Query/Retrieve Level; empty if the identifier had none.
    pub level: &'a str,
    /// The requested keys, `(gggg,eeee)=value` for matching keys.
    pub keys: &'a str,
    /// Pending responses sent.
    pub matches: u64,
    /// The final status, 4 hex digits ("0000", "FE00", "A900").
    #[serde(serialize_with = "ser_status")]
    pub status: u16,
    /// Why it failed, when it did; null otherwise.
    pub reason: Option<&'a str>,
    /// From the identifier to the final response.
    pub milliseconds: u64,
}

/// One C-MOVE or C-GET, written when its final response is sent: who
/// asked for what, where it went, how many sub-operations completed,
/// failed or warned, and how it ended.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "retrieve")]
pub struct RetrieveRecord<'a> {
    /// When the final response was sent.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title of the association.
    pub calling_ae: &'a str,
    /// "C-MOVE" or "C-GET".
    pub operation: &'a str,
    /// The information model (Affected SOP Class UID).
    pub sop_class_uid: &'a str,
    /// The Query/Retrieve Level; empty if the identifier had none.
    pub level: &'a str,
    /// The keys, `(gggg,eeee)=value`.
    pub keys: &'a str,
    /// The Move Destination (C-MOVE); null for C-GET.
    pub destination: Option<&'a str>,
    /// Sub-operations completed.
    pub completed: u32,
    /// Sub-operations failed.
    pub failed: u32,
    /// Sub-operations completed with a warning.
    pub warning: u32,
    /// Sub-operations not begun (after a cancel or a failure).
    pub remaining: u32,
    /// The final status, 4 hex digits ("0000", "B000", "A801", "FE00").
    #[serde(serialize_with = "ser_status")]
    pub status: u16,
    /// Why it failed, when it did; null otherwise.
    pub reason: Option<&'a str>,
    /// From the identifier to the final response.
    pub milliseconds: u64,
}

/// One object forwarded to a destination (`[[forward]]`), written when
/// the destination's answer is recorded: delivered, failed for good, or
/// committed (storage commitment confirmed). Attempts that will be retried
/// get no line (the service log has them).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "forward")]
pub struct ForwardRecord<'a> {
    /// When the outcome was recorded.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The destination's AE title.
    pub destination: &'a str,
    /// "delivered", "failed" or "committed".
    pub outcome: &'a str,
    /// SOP Class UID of the object.
    pub sop_class_uid: &'a str,
    /// SOP Instance UID of the object.
    pub sop_instance_uid: &'a str,
    /// The stored file, relative to the store's root.
    pub path: &'a str,
    /// The destination's status, 4 hex digits; null when it gave none.
    #[serde(serialize_with = "ser_opt_status")]
    pub status: Option<u16>,
    /// Why it failed; null otherwise.
    pub reason: Option<&'a str>,
    /// Attempts made, this one included.
    pub attempts: u32,
}

/// A study deleted by retention (`[retention]`): which, how much, and why.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "deleted")]
pub struct DeletionRecord<'a> {
    /// When it was deleted.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// (0020,000D) Study Instance UID.
    pub study_instance_uid: &'a str,
    /// (0010,0020) Patient ID.
    pub patient_id: &'a str,
    /// Objects deleted.
    pub objects: u64,
    /// Bytes of files deleted.
    pub bytes: u64,
    /// When its newest object was received.
    #[serde(serialize_with = "ser_time")]
    pub last_received: SystemTime,
    /// Why ("free space below 15 %", "received over 30 days ago").
    pub reason: &'a str,
}

/// A software update dropped on the device (`minipacs update apply`):
/// installed, refused, rolled back, or failed even to roll back. Owned,
/// because it reaches the service through the audit spool
/// ([`super::spool`]): the updater runs outside the service and hands it
/// the record, so that the service stays the trail's one writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename = "update")]
pub struct UpdateRecord {
    /// When the outcome was decided (RFC 3339).
    pub time: String,
    /// "installed", "refused", "rolled_back" or "failed".
    pub outcome: String,
    /// The dropped file's name.
    pub package: String,
    /// The package's version, when it was read (null for an unsigned or
    /// unreadable one).
    pub version: Option<String>,
    /// The version installed before.
    pub installed_before: Option<String>,
    /// What was checked, or why it was refused or rolled back (the result
    /// file's words).
    pub reason: String,
}

/// An association request turned away: answered with A-ASSOCIATE-RJ
/// (called AE title wrong, calling AE title not allowed, association cap
/// reached, ...) or refused before negotiation (a malformed request).
/// Written as an `association` line with outcome `rejected` and the reason.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedRecord<'a> {
    /// When the request was refused.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title (empty if the request could not be read).
    pub calling_ae: &'a str,
    /// Called AE title (empty if the request could not be read).
    pub called_ae: &'a str,
    /// Negotiated TLS version; null on the plain port.
    pub tls_version: Option<&'a str>,
    /// Negotiated cipher suite; null on the plain port.
    pub tls_suite: Option<&'a str>,
    /// Subject of the peer's TLS client certificate, if it sent one.
    pub tls_peer_subject: Option<&'a str>,
    /// Why, in words (the same text as the service log's line).
    pub reason: &'a str,
}

/// A connection to the TLS port that never became a TLS session: the
/// handshake failed (no client certificate, one from another CA, no common
/// protocol version or cipher, not TLS at all) or did not finish in time.
/// Written as an `association` line with outcome `tls_failed`.
#[derive(Debug, Clone, Serialize)]
pub struct TlsFailedRecord<'a> {
    /// When the handshake was given up.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Why: the TLS library's error, or what we saw instead of a handshake.
    pub reason: &'a str,
}

/// A refusal as it is written: an `association` line whose outcome says
/// which kind, so one query over association lines finds every peer.
#[derive(Serialize)]
#[serde(tag = "event", rename = "association")]
struct Refusal<'r, T: Serialize> {
    outcome: AssociationOutcome,
    #[serde(flatten)]
    record: &'r T,
}

/// The audit trail: `audit.jsonl`, one JSON object per line, rotated and
/// bounded like the service log but with its own budget.
///
/// Each record is serialized before the lock is taken and written with a
/// single `write_all`, so writers on many threads never interleave and
/// hold the lock only for one `write(2)`. Share it with `Arc<Audit>`.
/// serde_json escapes control characters, so a hostile AE title cannot
/// break a line in two.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    file: Mutex<RotatingFile>,
    failing: AtomicBool,
}

impl Audit {
    /// Opens the audit trail in `dir`, creating it, bounded by `budget`.
    pub fn open(dir: &Path, budget: Budget) -> Result<Audit, LogsError> {
        Ok(Audit {
            dir: dir.to_path_buf(),
            file: Mutex::new(RotatingFile::open(dir, AUDIT_FILE, budget, false)?),
            failing: AtomicBool::new(false),
        })
    }

    /// As [`Audit::open`], in a folder already open (the one the keeper
    /// handed the worker, say).
    pub fn open_in(dir: crate::dirfd::Folder, budget: Budget) -> Result<Audit, LogsError> {
        Ok(Audit {
            dir: dir.path().to_path_buf(),
            file: Mutex::new(RotatingFile::open_in(dir, AUDIT_FILE, budget, false)?),
            failing: AtomicBool::new(false),
        })
    }

    /// Records an association. Returns whether the line reached the file.
    pub fn association(&self, record: &AssociationRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records one object. Returns whether the line reached the file.
    pub fn object(&self, record: &ObjectRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records one C-FIND. Returns whether the line reached the file.
    pub fn find(&self, record: &FindRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records a C-MOVE or C-GET. Returns whether the line reached the
    /// file.
    pub fn retrieve(&self, record: &RetrieveRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records an object forwarded (or refused for good, or committed).
    /// Returns whether the line reached the file.
    pub fn forward(&self, record: &ForwardRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records a study deleted by retention. Returns whether the line
    /// reached the file.
    pub fn deletion(&self, record: &DeletionRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records a software update's outcome (from the spool). Returns
    /// whether the line reached the file.
    pub fn update(&self, record: &UpdateRecord) -> bool {
        self.append(record)
    }

    /// Records a refused association request. Returns whether the line
    /// reached the file.
    pub fn rejected(&self, record: &RejectedRecord<'_>) -> bool {
        self.append(&Refusal {
            outcome: AssociationOutcome::Rejected,
            record,
        })
    }

    /// Records a failed TLS handshake. Returns whether the line reached the
    /// file.
    pub fn tls_failed(&self, record: &TlsFailedRecord<'_>) -> bool {
        self.append(&Refusal {
            outcome: AssociationOutcome::TlsFailed,
            record,
        })
    }

    /// Shorthand for [`Audit::tls_failed`] at the moment of the failure.
    pub fn tls_failed_now(&self, peer: SocketAddr, reason: &dyn Display) -> bool {
        self.tls_failed(&TlsFailedRecord {
            time: SystemTime::now(),
            peer,
            reason: &reason.to_string(),
        })
    }

    /// Makes the records written so far durable. Called before an
    /// association's release is answered, so that a power cut right after a
    /// sender was told its objects are stored cannot take their records.
    /// (Once per association, not per object: each would cost an fsync.)
    pub fn sync(&self) -> bool {
        match lock(&self.file).sync_data() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "audit trail sync failed");
                false
            }
        }
    }

    /// The audit folder, for the bundle.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lines written and dropped so far.
    pub fn stats(&self) -> WriterStats {
        lock(&self.file).stats()
    }

    fn append<T: Serialize>(&self, record: &T) -> bool {
        let written = match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                lock(&self.file).write_record(&line)
            }
            Err(_) => {
                lock(&self.file).count_dropped();
                false
            }
        };
        // Say so once per outage, outside the audit lock (the service log
        // has its own).
        if self.failing.swap(!written, Ordering::Relaxed) == written {
            if written {
                tracing::info!(dir = %self.dir.display(), "audit trail writable again");
            } else {
                tracing::warn!(dir = %self.dir.display(), "audit trail write failed; dropping records");
            }
        }
        written
    }
}

fn ser_time<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*time))
}

fn ser_seconds<S: Serializer>(seconds: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((seconds * 1000.0).round() / 1000.0)
}

fn ser_status<S: Serializer>(status: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{status:04X}"))
}

fn ser_opt_status<S: Serializer>(status: &Option<u16>, s: S) -> Result<S::Ok, S::Error> {
    match status {
        Some(status) => ser_status(status, s),
        None => s.serialize_none(),
    }
}

fn ser_opt_path<S: Serializer>(path: &Option<&Path>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        // Lossy rather than failing: a non-UTF-8 name must not cost the line.
        Some(p) => s.serialize_str(&p.to_string_lossy()),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::test_util::{lines, object};
    use std::time::{Duration, UNIX_EPOCH};

    fn association(calling: &str) -> AssociationRecord<'_> {
        AssociationRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            peer: "192.0.2.7:40123".parse().expect("addr"),
            calling_ae: calling,
            called_ae: "MINIPACS",
            tls_version: Some("TLSv1.3"),
            tls_suite: Some("TLS13_AES_128_GCM_SHA256"),
            tls_peer_subject: None,
            outcome: AssociationOutcome::Released,
            objects_stored: 3,
            objects_failed: 1,
            bytes: 123_456,
            seconds: 2.345_678,
        }
    }

    #[test]
    fn audit_lines_are_json_with_the_right_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open(dir.path(), Budget::default()).expect("open");
        assert!(audit.association(&association("CT\nSCANNER\"1")));
        assert!(audit.object(&object(1000)));
        let stored = dir.path().join("store/1.2.3.4.5.dcm");
        assert!(audit.object(&ObjectRecord {
            status: 0,
            stored_path: Some(&stored),
            ..object(2000)
        }));
        let got = lines(&dir.path().join(AUDIT_FILE));
        assert_eq!(got.len(), 3);
        let v: Vec<serde_json::Value> = got
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let a = &v[0];
        assert_eq!(a["event"], "association");
        assert_eq!(a["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(a["peer"], "192.0.2.7:40123");
        assert_eq!(a["calling_ae"], "CT\nSCANNER\"1");
        assert_eq!(a["called_ae"], "MINIPACS");
        assert_eq!(a["tls_version"], "TLSv1.3");
        assert_eq!(a["tls_suite"], "TLS13_AES_128_GCM_SHA256");
        assert!(a["tls_peer_subject"].is_null());
        assert_eq!(a["outcome"], "released");
        assert_eq!(a["objects_stored"], 3);
        assert_eq!(a["objects_failed"], 1);
        assert_eq!(a["bytes"], 123_456);
        assert_eq!(a["seconds"], 2.346);
        let o = &v[1];
        assert_eq!(o["event"], "object");
        assert_eq!(o["time"], "2023-11-14T22:13:21.000Z");
        assert_eq!(o["peer"], "[2001:db8::1]:104");
        assert_eq!(o["calling_ae"], "MODALITY");
        assert_eq!(o["sop_class_uid"], "1.2.840.10008.5.1.4.1.1.7");
        assert_eq!(o["sop_instance_uid"], "1.2.3.4.5");
        assert_eq!(o["bytes"], 1000);
        assert_eq!(o["status"], "A700");
        assert_eq!(o["milliseconds"], 42);
        assert!(o["stored_path"].is_null());
        assert_eq!(v[2]["status"], "0000");
        assert_eq!(v[2]["stored_path"], stored.to_str().expect("utf-8"));
        assert_eq!(audit.stats().records_written, 3);
    }

    #[test]
    fn refusals_are_association_lines_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open(dir.path(), Budget::default()).expect("open");
        let peer: SocketAddr = "192.0.2.8:5000".parse().expect("addr");
        assert!(audit.rejected(&RejectedRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
            peer,
            calling_ae: "ECHOSCU",
            called_ae: "WRONG",
            tls_version: None,
            tls_suite: None,
            tls_peer_subject: None,
            reason: "called AE title not recognized",
        }));
        assert!(audit.rejected(&RejectedRecord {
            tls_version: Some("TLSv1_3"),
            tls_peer_subject: Some("CN=ct1"),
            reason: "association limit reached",
            ..RejectedRecord {
                time: UNIX_EPOCH,
                peer,
                calling_ae: "CT1",
                called_ae: "MINIPACS",
                tls_version: None,
                tls_suite: None,
                tls_peer_subject: None,
                reason: "",
            }
        }));
        assert!(audit.tls_failed_now(peer, &"peer sent no certificates"));
        let got: Vec<serde_json::Value> = lines(&dir.path().join(AUDIT_FILE))
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(got.len(), 3);
        let r = &got[0];
        assert_eq!(r["event"], "association");
        assert_eq!(r["outcome"], "rejected");
        assert_eq!(r["time"], "2023-11-14T22:13:20.500Z");
        assert_eq!(r["peer"], "192.0.2.8:5000");
        assert_eq!(r["calling_ae"], "ECHOSCU");
        assert_eq!(r["called_ae"], "WRONG");
        assert!(r["tls_version"].is_null());
        assert_eq!(r["reason"], "called AE title not recognized");
        assert_eq!(got[1]["tls_version"], "TLSv1_3");
        assert_eq!(got[1]["tls_peer_subject"], "CN=ct1");
        assert_eq!(got[1]["reason"], "association limit reached");
        let t = &got[2];
        assert_eq!(t["event"], "association");
        assert_eq!(t["outcome"], "tls_failed");
        assert_eq!(t["peer"], "192.0.2.8:5000");
        assert_eq!(t["reason"], "peer sent no certificates");
        assert!(t["time"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert_eq!(audit.stats().records_written, 3);
    }
}
