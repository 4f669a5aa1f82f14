//! systemd integration: the service tells systemd how it is (READY, STATUS,
//! RELOADING, STOPPING) and proves it is alive (WATCHDOG).
//!
//! The receiver emits [`ServiceEvent`]s; this module turns them into
//! sd_notify messages. The heartbeat comes from a task on the receiver's own
//! event loop, so a stuck loop stops the WATCHDOG pings and systemd restarts
//! the service. When privileges are separated the worker's events travel to
//! the keeper (the service's main PID, which systemd listens to) and are
//! notified there; the keeper pings the watchdog only while the worker's
//! heartbeats keep arriving.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// What the receiver tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
    /// All listeners are accepting connections.
    Ready,
    /// A human-readable status line (associations, objects, free space).
    Status(String),
    /// The event loop is alive (sent every second by a task on it).
    Alive,
    /// A reload (certificates or configuration) starts.
    Reloading,
    /// A reload finished (whether or not it took).
    Reloaded,
    /// The service is stopping.
    Stopping,
}

impl ServiceEvent {
    /// One-line wire form, for the keeper-worker channel.
    pub fn encode(&self) -> String {
        match self {
            ServiceEvent::Ready => "READY".into(),
            ServiceEvent::Status(s) => format!("STATUS {}", s.replace('\n', " ")),
            ServiceEvent::Alive => "ALIVE".into(),
            ServiceEvent::Reloading => "RELOADING".into(),
            ServiceEvent::Reloaded => "RELOADED".into(),
            ServiceEvent::Stopping => "STOPPING".into(),
        }
    }

    /// Parses the wire form; `None` for anything else.
    pub fn decode(line: &str) -> Option<Self> {
        Some(match line {
            "READY" => ServiceEvent::Ready,
            "ALIVE" => ServiceEvent::Alive,
            "RELOADING" => ServiceEvent::Reloading,
            "RELOADED" => ServiceEvent::Reloaded,
            "STOPPING" => ServiceEvent::Stopping,
            other => ServiceEvent::Status(other.strip_prefix("STATUS ")?.to_string()),
        })
    }
}

/// Sends heartbeats from the current runtime until `stop` is cancelled (or
/// nobody listens any more). It holds a sender of the event channel, so it
/// must end for the channel to close.
pub async fn heartbeat(events: mpsc::Sender<ServiceEvent>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if events.send(ServiceEvent::Alive).await.is_err() {
            return;
        }
    }
}

/// Turns service events into sd_notify messages until the channel closes.
/// Without NOTIFY_SOCKET (not under systemd) the messages go nowhere.
pub async fn notify_systemd(mut events: mpsc::Receiver<ServiceEvent>) {
    let watchdog = sd_notify::watchdog_enabled();
    // Ping at half the watchdog interval, as sd_watchdog_enabled(3) advises.
    let ping_every = watchdog.map(|w| w / 2);
    let mut last_ping: Option<Instant> = None;
    // The keeper and the worker may both announce a stop or a reload:
    // systemd hears each state change once.
    let mut last_state: Option<ServiceEvent> = None;
    while let Some(event) = events.recv().await {
        if matches!(
            event,
            ServiceEvent::Ready | ServiceEvent::Reloading | ServiceEvent::Stopping
        ) {
            if last_state.as_ref() == Some(&event) {
                continue;
            }
            last_state = Some(event.clone());
        }
        if event == ServiceEvent::Reloaded {
            last_state = Some(ServiceEvent::Ready);
        }
        let state = match &event {
            ServiceEvent::Ready => vec![sd_notify::NotifyState::Ready],
            ServiceEvent::Status(s) => vec![sd_notify::NotifyState::Status(s)],
            ServiceEvent::Reloading => vec![sd_notify::NotifyState::Reloading],
            ServiceEvent::Reloaded => vec![sd_notify::NotifyState::Ready],
            ServiceEvent::Stopping => vec![sd_notify::NotifyState::Stopping],
            ServiceEvent::Alive => match ping_every {
                Some(every) if last_ping.is_none_or(|t| t.elapsed() >= every) => {
                    last_ping = Some(Instant::now());
                    vec![sd_notify::NotifyState::Watchdog]
                }
                _ => continue,
            },
        };
        if let Err(e) = sd_notify::notify(&state) {
            debug!(error = %e, ?event, "sd_notify");
        }
    }
}

/// The activity LED: a short blink per stored object, so a nurse can see
/// images arrive. Blinks that come while one is lit are merged.
pub struct ActivityLed {
    file: std::fs::File,
    lit: std::sync::atomic::AtomicBool,
}

impl Drop for ActivityLed {
    /// A service that has stopped does not leave the LED lit.
    fn drop(&mut self) {
        self.set(false);
    }
}

impl ActivityLed {
    /// Wraps an open sysfs `brightness` file (or any writable file).
    pub fn new(file: std::fs::File) -> Self {
        ActivityLed {
            file,
            lit: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Opens `path` for writing, switching its trigger off first so that
    /// the kernel does not drive the LED too; `None` (and a warning) if the
    /// LED cannot be had: a missing LED must not stop the service.
    pub fn open(path: &std::path::Path) -> Option<std::fs::File> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::write(dir.join("trigger"), "none");
        }
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(led = %path.display(), error = %e, "activity LED unavailable");
                None
            }
        }
    }

    fn set(&self, on: bool) {
        use std::os::unix::fs::FileExt;
        let _ = self.file.write_at(if on { b"1\n" } else { b"0\n" }, 0);
    }

    /// Lights the LED for a moment (on the runtime, without blocking). The
    /// task that puts it out again is not a task of the shutdown (it lasts
    /// 40 ms); if it is dropped with the runtime, the LED is put out when
    /// the last holder goes (see `Drop`).
    pub fn blink(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.lit.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set(true);
        let led = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            led.set(false);
            led.lit.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for e in [
            ServiceEvent::Ready,
            ServiceEvent::Alive,
            ServiceEvent::Reloading,
            ServiceEvent::Reloaded,
            ServiceEvent::Stopping,
            ServiceEvent::Status("3 associations; 12 stored".into()),
        ] {
            assert_eq!(ServiceEvent::decode(&e.encode()), Some(e));
        }
        assert_eq!(ServiceEvent::decode("NONSENSE"), None);
    }
}
