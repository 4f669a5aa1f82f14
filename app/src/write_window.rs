//! A write window on the drop folder.
//!
//! On the image the drop folder is on the FAT boot partition, which holds
//! the firmware and the kernel. A FAT mounted read-write is marked dirty,
//! so a power cut (the only way a bedside device is ever switched off)
//! would leave it dirty every time. The image therefore keeps it read-only
//! and opens it only while something is written there. Remounting needs
//! privileges the service's sandbox does not have (no CAP_SYS_ADMIN, no
//! mount system calls), so a small helper outside it does the remounting
//! (`minipacs bootfs-window`, [`serve`], started per connection by
//! minipacs-bootfs.socket) and the service asks it with [`open`].
//!
//! The exchange over [`SOCKET`]: the service connects; the helper makes the
//! file system writable and answers one line, `rw`, with the drop folder
//! opened (a descriptor passed with SCM_RIGHTS); the service writes through
//! that descriptor ([`WriteWindow::folder`]) and closes its side
//! ([`WriteWindow`]'s drop); the helper syncs, remounts read-only, answers
//! `ro` and closes. Without the socket (any install but the image) there is
//! nothing to ask and the folder is written as it is.
//!
//! Why a descriptor: the service runs in a mount namespace of its own
//! (ProtectSystem=strict), whose copy of the boot partition's mount keeps
//! the read-only flag it was made with; the helper's remount changes its
//! own mount, not that copy. Paths opened through `/proc/self/fd/N` of a
//! descriptor the helper opened resolve through the helper's mount, which
//! the remount made writable. (Without it every write in the window failed
//! with "Read-only file system" on the image.)
//!
//! The helper's side is [`serve`], run by the image's
//! `minipacs-bootfs@.service` as `minipacs bootfs-window` for each
//! connection.

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

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
    /// the drop folder, opened by the helper on its writable mount
    folder: Option<OwnedFd>,
}

impl WriteWindow {
    /// Whether a helper opened this window (false: there is none to ask).
    pub fn is_helped(&self) -> bool {
        self.helper.is_some()
    }

    /// Where to write the drop folder `dir` while the window is open: the
    /// folder the helper opened (`/proc/self/fd/N`, which resolves through
    /// its writable mount), or `dir` itself when there is no helper or it
    /// sent none.
    pub fn folder(&self, dir: &Path) -> PathBuf {
        match &self.folder {
            Some(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            None => dir.to_path_buf(),
        }
    }
}

/// Opens a write window through the image's helper, if there is one. A
/// failure is logged and the writes are attempted anyway: they fail with
/// their own errors (read-only file system) where the window did not open.
pub fn open() -> WriteWindow {
    open_at(Path::new(SOCKET)).unwrap_or_else(|e| {
        warn!(error = %e, "cannot open the drop folder for writing");
        WriteWindow {
            helper: None,
            folder: None,
        }
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(WriteWindow {
                helper: None,
                folder: None,
            })
        }
        Err(e) => return Err(io_error(e)),
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_error)?;
    // The first bytes carry the folder's descriptor, if the helper sends one.
    let (first, folder) = receive_with_fd(&stream).map_err(io_error)?;
    let mut answer = String::from_utf8_lossy(&first).into_owned();
    let mut helper = BufReader::new(stream);
    if !answer.ends_with('\n') && !first.is_empty() {
        helper.read_line(&mut answer).map_err(io_error)?;
    }
    if answer.trim_end() != "rw" {
        return Err(WindowError::Refused {
            socket: socket.to_path_buf(),
            answer: answer.trim_end().to_string(),
        });
    }
    Ok(WriteWindow {
        helper: Some(helper),
        folder,
    })
}

/// Reads what the helper sent first, and the descriptor passed with it.
fn receive_with_fd(stream: &UnixStream) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        (msg.bytes, fds)
    };
    let mut owned: Vec<OwnedFd> = fds.into_iter().map(own_received).collect();
    Ok((buf[..bytes].to_vec(), owned.pop()))
}

/// Takes ownership of a descriptor received with SCM_RIGHTS.
#[allow(unsafe_code)]
fn own_received(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process's table while
    // delivering this message (recvmsg above, with MSG_CMSG_CLOEXEC); it
    // is a new descriptor that no other code in this process has seen, so
    // the OwnedFd made here is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Drop for WriteWindow {
    fn drop(&mut self) {
        // Our descriptor of the folder is closed before the helper
        // remounts read-only.
        drop(self.folder.take());
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

/// The helper's side of one window, on the connection `conn`: makes the
/// file system at `mount` writable, passes the folder `folder` opened on it
/// with the `rw` answer, waits until the service closes its side (at most
/// `hold`), then syncs and remounts read-only, answering `ro`. Windows may
/// overlap (a service restarted mid-write): each holds a shared lock on
/// `lock` while open, and the last one out (exclusive lock) closes the
/// partition. Progress goes to standard error (the journal).
pub fn serve(
    mut conn: UnixStream,
    mount: &Path,
    folder: &Path,
    lock: &Path,
    hold: Duration,
) -> io::Result<()> {
    use nix::fcntl::{Flock, FlockArg};
    let shared = std::fs::File::create(lock)
        .and_then(|f| Flock::lock(f, FlockArg::LockShared).map_err(|(_, e)| e.into()))?;
    if let Err(why) = remount(mount, "rw") {
        writeln!(
            conn,
            "error: cannot remount {} read-write: {why}",
            mount.display()
        )?;
        return Ok(());
    }
    eprintln!("boot partition writable");
    let opened = std::fs::File::open(folder)?;
    let fds = [opened.as_raw_fd()];
    sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[IoSlice::new(b"rw\n")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    drop(opened);
    // Until the service closes its side, or `hold` passes.
    conn.set_read_timeout(Some(hold))?;
    let mut sink = [0u8; 512];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    let file = shared.unlock().map_err(|(_, e)| io::Error::from(e))?;
    let _exclusive =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    let synced = Command::new("sync").arg("-f").arg(mount).status();
    if !synced.is_ok_and(|s| s.success()) {
        eprintln!("sync -f {} failed", mount.display());
    }
    match remount(mount, "ro") {
        Ok(()) => {
            eprintln!("boot partition read-only again");
            writeln!(conn, "ro")
        }
        Err(why) => writeln!(
            conn,
            "error: cannot remount {} read-only: {why}",
            mount.display()
        ),
    }
}

/// `mount -o remount,MODE MOUNT`.
fn remount(mount: &Path, mode: &str) -> Result<(), String> {
    let out = Command::new("mount")
        .arg("-o")
        .arg(format!("remount,{mode}"))
        .arg(mount)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
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
    fn writes_go_through_the_folder_the_helper_opened() {
        // A read-only tmpfs as the boot partition, the real helper side
        // (`serve`) on the other end of the socket. Needs root (mounts),
        // as the whole suite does.
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts a tmpfs: run it as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("boot");
        std::fs::create_dir(&mount).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "bootfs"])
            .arg(&mount)
            .status()
            .expect("mount");
        assert!(status.success());
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mount.clone());
        let socket = dir.path().join("bootfs.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (m, l) = (mount.clone(), dir.path().join("lock"));
        let helper = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            serve(conn, &m, &m, &l, Duration::from_secs(10))
        });
        assert!(
            std::fs::write(mount.join("before"), "x").is_err(),
            "read-only"
        );
        let window = open_at(&socket).expect("window");
        let folder = window.folder(&mount);
        assert!(folder.starts_with("/proc/self/fd/"), "{}", folder.display());
        std::fs::write(folder.join("result"), "APPLIED\n").expect("writable in the window");
        drop(window);
        helper.join().expect("helper").expect("served");
        assert_eq!(
            std::fs::read_to_string(mount.join("result")).expect("written"),
            "APPLIED\n"
        );
        assert!(
            std::fs::write(mount.join("after"), "x").is_err(),
            "read-only again"
        );
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
