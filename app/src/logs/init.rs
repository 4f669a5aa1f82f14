//! Process-wide logging set-up: stderr (journald under systemd) from the
//! first line, the bounded file log once the configuration says where,
//! and the file log's counters for the status line.
//!
//! The `tracing` subscriber is global to the process, so the file log that
//! feeds it is too: [`attach_file_log`] keeps it in one slot, from which
//! [`service_log_stats`] reads and [`flush_file_log`] drains it at exit.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use super::rotation::{Budget, WriterStats};
use super::writer::{LogDir, ServiceLog};

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

/// Adds the bounded file log `name` in `dir`, written from a background
/// thread (see [`ServiceLog`]). A log folder that cannot be opened is
/// reported and logging goes on to stderr only: logs must never stop the
/// service.
pub fn attach_file_log(handle: &FileLogHandle, dir: &Path, name: &str, max_bytes: u64) {
    use tracing_subscriber::Layer;
    let budget = Budget {
        max_bytes,
        files: Budget::DEFAULT.files,
    };
    match LogDir::open_named(dir, name, budget) {
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
            tracing::warn!(dir = %dir.display(), error = %e, "file log unavailable; logging to stderr only")
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
