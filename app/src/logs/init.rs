//! Process-wide logging set-up: stderr (journald under systemd) from the
//! first line, the bounded file log once the configuration says where,
//! and the file log's counters for the status line.
//!
//! The `tracing` subscriber is global to the process, so the file log that
//! feeds it is too: [`attach_file_log`] keeps it in one slot, from which
//! [`service_log_stats`] reads and [`flush_file_log`] drains it at exit.

use std::sync::{Arc, Mutex, PoisonError};

use super::rotation::{Budget, WriterStats};
use super::writer::{LogDir, ServiceLog};
use crate::dirfd::Folder;

/// The slot for the file log layer, filled once the configuration (and so
/// the log folder) is known: logging starts on stderr before that.
pub type FileLayer =
    Option<Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>>;

/// Handle to fill the [`FileLayer`] slot.
pub type FileLogHandle =
    tracing_subscriber::reload::Handle<FileLayer, tracing_subscriber::Registry>;

/// Starts logging: to stderr (which systemd sends to journald) at once,
/// and to files once [`attach_file_log`] is called. `RUST_LOG` sets the level.
pub fn init_logging() -> FileLogHandle {
    use tracing_subscriber::prelude::*;
    let (file_layer, handle) = tracing_subscriber::reload::Layer::new(None);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(file_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .with(filter)
        .init();
    handle
}

/// The file log of this process, for its counters and the flush at exit.
static SERVICE_LOG: Mutex<Option<Arc<ServiceLog>>> = Mutex::new(None);

/// Adds the bounded file log `name` in the log folder `dir` (held open:
/// see [`crate::handover`]), written from a background thread (see
/// [`ServiceLog`]). A log that cannot be opened is reported and logging
/// goes on to stderr only: logs must never stop the service.
pub fn attach_file_log(handle: &FileLogHandle, dir: &Folder, name: &str, max_bytes: u64) {
    use tracing_subscriber::Layer;
    let budget = Budget {
        max_bytes,
        files: Budget::DEFAULT.files,
    };
    let opened = dir
        .try_clone()
        .map_err(|e| super::LogsError::Io {
            what: "open log folder",
            path: dir.path().to_path_buf(),
            source: e,
        })
        .and_then(|folder| LogDir::open_in(folder, name, budget));
    match opened {
        Ok(log) => {
            let log = Arc::new(ServiceLog::start(log, super::writer::QUEUE_LINES));
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(log.writer())
                .with_ansi(false)
                .boxed();
            let previous = slot().replace(Arc::clone(&log));
            if let Err(e) = handle.reload(Some(layer)) {
                tracing::warn!(error = %e, "file log not attached");
            }
            if let Some(previous) = previous {
                previous.flush();
            }
        }
        Err(e) => {
            tracing::warn!(dir = %dir.path().display(), error = %e, "file log unavailable; logging to stderr only")
        }
    }
}

/// The counters of this process's file log (lines written, dropped by a
/// full queue or a failing disk, ...); None before [`attach_file_log`].
pub fn service_log_stats() -> Option<WriterStats> {
    slot().as_ref().map(|log| log.stats())
}

/// Writes out the lines still queued for the file log (waiting at most
/// about a second); call once at the end of the process. Lines logged
/// after it reach stderr only.
pub fn flush_file_log() {
    let log = slot().take();
    if let Some(log) = log {
        log.flush();
    }
}

fn slot() -> std::sync::MutexGuard<'static, Option<Arc<ServiceLog>>> {
    // The slot is only ever replaced whole, so a poisoned lock is usable.
    SERVICE_LOG.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the log writers of this process are doing: what the status line
/// and the status file (and so the bundle's `status.txt`) show, because
/// the writers never report their failures any other way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogHealth {
    /// The service log's counters; None before the file log is attached.
    pub service_log: Option<WriterStats>,
    /// The audit trail's counters; None without an audit trail.
    pub audit: Option<WriterStats>,
}

impl LogHealth {
    /// The counters now, of this process's file log and of `audit`.
    pub fn now(audit: Option<&super::Audit>) -> LogHealth {
        LogHealth {
            service_log: service_log_stats(),
            audit: audit.map(super::Audit::stats),
        }
    }

    /// Lines lost, of both writers together.
    pub fn dropped(&self) -> u64 {
        let dropped = |s: Option<WriterStats>| s.map_or(0, |s| s.records_dropped);
        dropped(self.service_log).saturating_add(dropped(self.audit))
    }

    /// What the status line gets: `; N log line(s) dropped`, or nothing
    /// while no line was lost.
    pub fn status_suffix(&self) -> String {
        match self.dropped() {
            0 => String::new(),
            n => format!("; {n} log line(s) dropped"),
        }
    }

    /// One line for the status file: each writer's losses, cut lines and
    /// I/O errors (not its running totals, so the line changes only when
    /// something goes wrong).
    pub fn report(&self) -> String {
        let part = |name: &str, s: Option<WriterStats>| match s {
            Some(s) => format!(
                "{name}: {} line(s) dropped, {} cut, {} I/O error(s)",
                s.records_dropped, s.records_truncated, s.io_errors
            ),
            None => format!("{name}: not written by this process"),
        };
        format!(
            "log writers: {}; {}",
            part("service log", self.service_log),
            part("audit trail", self.audit)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_suffix_appears_only_when_lines_were_lost() {
        let clean = WriterStats {
            records_written: 10,
            ..WriterStats::default()
        };
        let mut health = LogHealth {
            service_log: Some(clean),
            audit: Some(clean),
        };
        assert_eq!(health.status_suffix(), "");
        health.service_log = Some(WriterStats {
            records_dropped: 3,
            ..clean
        });
        health.audit = Some(WriterStats {
            records_dropped: 1,
            io_errors: 2,
            ..clean
        });
        assert_eq!(health.status_suffix(), "; 4 log line(s) dropped");
        assert_eq!(
            health.report(),
            "log writers: service log: 3 line(s) dropped, 0 cut, 0 I/O error(s); \
             audit trail: 1 line(s) dropped, 0 cut, 2 I/O error(s)"
        );
        assert!(LogHealth::default()
            .report()
            .contains("audit trail: not written by this process"));
    }
}
