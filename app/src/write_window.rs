//! A write window on the drop folder.
//!
//! On the image the drop folder is on the FAT boot partition, which holds
//! the firmware and the kernel. A FAT mounted read-write is marked dirty,
//! so a power cut (the only way a bedside device is ever switched off)
//! would leave it dirty every time. The image therefore keeps it read-only
//! and opens it only while something is written there. Remounting needs
//! privileges the service's sandbox does not have (no CAP_SYS_ADMIN, no
//! mount system calls), so a small helper outside it does the remounting
//! (image-build/bootfs-window, started per connection by
//! minipacs-bootfs.socket) and the service asks it with [`open`].
//!
//! The exchange over [`SOCKET`]: the service connects; the helper makes the
//! file system writable and answers one line, `rw`; the service writes and
//! closes its side ([`WriteWindow`]'s drop); the helper syncs, remounts
//! read-only, answers `ro` and closes. Without the socket (any install but
//! the image) there is nothing to ask and the folder is written as it is.

use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

/// Where the image's helper listens.
pub const SOCKET: &str = "/run/minipacs-bootfs.sock";

/// How long the helper may take to open or to close the window. Remounting
/// a FAT takes milliseconds; a helper that does not answer in this time is
/// given up on, and the writes then fail (and are logged) as on any
/// read-only folder.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a write window could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// Talking to the helper failed.
    #[error("write window helper {}: {source}", socket.display())]
    Io {
        /// the helper's socket
        socket: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
    /// The helper answered, but not that the folder is writable.
    #[error("write window helper {}: it answered {answer:?}, not \"rw\"", socket.display())]
    Refused {
        /// the helper's socket
        socket: PathBuf,
        /// its answer
        answer: String,
    },
}

/// An open write window: the folder is writable until this is dropped.
/// Dropping it waits (at most [`TIMEOUT`]) until the helper has synced the
/// file system and made it read-only again, so that whatever follows sees
/// the folder closed.
#[derive(Debug)]
pub struct WriteWindow {
    helper: Option<BufReader<UnixStream>>,
}

impl WriteWindow {
    /// Whether a helper opened this window (false: there is none to ask).
    pub fn is_helped(&self) -> bool {
        self.helper.is_some()
    }
}

/// Opens a write window through the image's helper, if there is one. A
/// failure is logged and the writes are attempted anyway: they fail with
/// their own errors (read-only file system) where the window did not open.
pub fn open() -> WriteWindow {
    open_at(Path::new(SOCKET)).unwrap_or_else(|e| {
        warn!(error = %e, "cannot open the drop folder for writing");
        WriteWindow { helper: None }
    })
}

/// [`open`] with the helper's socket at `socket`.
pub fn open_at(socket: &Path) -> Result<WriteWindow, WindowError> {
    let io_error = |source| WindowError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(WriteWindow { helper: None }),
        Err(e) => return Err(io_error(e)),
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_error)?;
    let mut helper = BufReader::new(stream);
    let mut answer = String::new();
    helper.read_line(&mut answer).map_err(io_error)?;
    if answer.trim_end() != "rw" {
        return Err(WindowError::Refused {
            socket: socket.to_path_buf(),
            answer: answer.trim_end().to_string(),
        });
    }
    Ok(WriteWindow {
        helper: Some(helper),
    })
}

impl Drop for WriteWindow {
    fn drop(&mut self) {
        let Some(mut helper) = self.helper.take() else {
            return;
        };
        let closed = helper
            .get_mut()
            .flush()
            .and_then(|()| helper.get_ref().shutdown(Shutdown::Write))
            .and_then(|()| {
                let mut answer = String::new();
                helper.read_line(&mut answer).map(|_| answer)
            });
        match closed {
            Ok(answer) if answer.trim_end() == "ro" => {}
            Ok(answer) => {
                warn!(
                    answer = answer.trim_end(),
                    "the drop folder's write window did not close read-only"
                )
            }
            Err(e) => warn!(error = %e, "closing the drop folder's write window"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// A stand-in for the image's helper: answers `answer`, records
    /// "rw", then "ro" when the service closes its side.
    fn helper(dir: &Path, answer: &'static str) -> (PathBuf, Arc<Mutex<Vec<&'static str>>>) {
        let socket = dir.join("bootfs.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&log);
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            seen.lock().expect("log").push("rw");
            writeln!(conn, "{answer}").expect("answer");
            let mut rest = String::new();
            io::Read::read_to_string(&mut conn, &mut rest).expect("until the service closes");
            seen.lock().expect("log").push("ro");
            let _ = writeln!(conn, "ro");
        });
        (socket, log)
    }

    #[test]
    fn the_window_is_open_while_held_and_closed_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, log) = helper(dir.path(), "rw");
        let window = open_at(&socket).expect("window");
        assert!(window.is_helped());
        assert_eq!(*log.lock().expect("log"), ["rw"]);
        drop(window);
        // The drop returned only after the helper had closed the window.
        assert_eq!(*log.lock().expect("log"), ["rw", "ro"]);
    }

    #[test]
    fn no_helper_means_nothing_to_ask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let window = open_at(&dir.path().join("absent.sock")).expect("no socket is no error");
        assert!(!window.is_helped());
    }

    #[test]
    fn a_helper_that_cannot_open_the_window_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, _) = helper(
            dir.path(),
            "error: cannot remount /boot/firmware read-write",
        );
        match open_at(&socket) {
            Err(WindowError::Refused { answer, .. }) => assert!(answer.contains("cannot remount")),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
