//! Durable atomic writes: a file is written under a temporary name in its
//! destination's folder, fdatasync'ed, renamed into place (replacing what
//! is there, or never), and the folder is fsync'ed.
//!
//! The appliance loses power without warning, so every file it writes for
//! later (the last good configuration, a drop folder's result file, the
//! field log bundle, the CA's keys, serial and index) must after a power
//! cut be the old one or the new one, never half of either, and a name
//! once visible must stay. One place does that dance, so each caller
//! states only what differs: the temp file's prefix, the file's mode, and
//! whether an existing file may be replaced.
//!
//! Built on [`Folder`]: every step is relative to the destination's open
//! folder, and "never replace" is `renameat2(RENAME_NOREPLACE)`, atomic
//! where a check-then-rename is not. (`atomic-write-file` was considered:
//! it always replaces and cannot stage a file to commit later, both of
//! which the CA needs; `tempfile` cannot create relative to a descriptor.)

use std::ffi::{OsStr, OsString};
use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::dirfd::Folder;

/// Why a durable write failed. The temp file is removed in every case.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// The destination exists and [`Replace::Never`] was asked for.
    #[error("{} already exists", path.display())]
    Exists {
        /// the destination
        path: PathBuf,
    },
    /// A file or folder operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// what was being done
        op: &'static str,
        /// the file or folder concerned
        path: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
}

impl DurableError {
    fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> DurableError + 'p {
        move |source| DurableError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// As an `io::Error` (an existing destination is `AlreadyExists`), for
    /// callers whose errors carry one.
    pub fn into_io(self) -> io::Error {
        match self {
            DurableError::Io { source, .. } => source,
            e @ DurableError::Exists { .. } => {
                io::Error::new(io::ErrorKind::AlreadyExists, e.to_string())
            }
        }
    }

    /// The operating system's error, if there is one (for callers that map
    /// into their own error types).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            DurableError::Io { source, .. } => Some(source),
            DurableError::Exists { .. } => None,
        }
    }
}

/// Whether committing may replace an existing destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Fail with [`DurableError::Exists`] if the destination exists
    /// (checked atomically by the rename itself).
    Never,
    /// Atomically replace the destination.
    Allowed,
}

/// A file written under a temporary name beside its destination, waiting
/// to be committed. Dropping it without [`Staged::commit`] removes it.
///
/// Two phases, so that a caller with several files (the CA: serial,
/// index, key, certificate) can write and sync them all before making any
/// visible, and fail without side effects if one cannot be written.
///
/// Every step is relative to the destination's folder, held open
/// ([`Folder`]): the same code serves a path and a folder handed over by
/// descriptor (the worker's log folder).
#[derive(Debug)]
pub struct Staged {
    file: File,
    dir: Folder,
    temp: OsString,
    dest: OsString,
    mode: Option<u32>,
    prepared: bool,
    committed: bool,
}

impl Staged {
    /// Creates the temp file (`prefix` + random, in `dest`'s folder) with
    /// mode 0600, so nothing is ever readable by others while it is being
    /// written. With `mode`, the file gets exactly that mode (whatever the
    /// umask) before it gets its name; without, it keeps the folder's
    /// defaults (on FAT, say, where a chmod is refused).
    pub fn create(dest: &Path, prefix: &str, mode: Option<u32>) -> Result<Staged, DurableError> {
        let dir = parent_dir(dest);
        let name = dest.file_name().ok_or_else(|| DurableError::Io {
            op: "naming",
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
        })?;
        let folder =
            Folder::open(dir).map_err(DurableError::io("creating a temporary file in", dir))?;
        Staged::create_in(folder, name, prefix, mode)
    }

    /// As [`Staged::create`], for the file `name` in the open folder `dir`.
    pub fn create_in(
        dir: Folder,
        name: &OsStr,
        prefix: &str,
        mode: Option<u32>,
    ) -> Result<Staged, DurableError> {
        let (file, temp) = dir
            .create_unique(prefix, "", 0o600)
            .map_err(DurableError::io("creating a temporary file in", dir.path()))?;
        Ok(Staged {
            file,
            dir,
            temp,
            dest: name.to_os_string(),
            mode,
            prepared: false,
            committed: false,
        })
    }

    /// Creates, writes `contents` and prepares, in one step.
    pub fn with_contents(
        dest: &Path,
        prefix: &str,
        contents: &[u8],
        mode: Option<u32>,
    ) -> Result<Staged, DurableError> {
        let mut staged = Staged::create(dest, prefix, mode)?;
        staged.write_and_prepare(contents)?;
        Ok(staged)
    }

    fn write_and_prepare(&mut self, contents: &[u8]) -> Result<(), DurableError> {
        let path = self.temp_path();
        (&self.file)
            .write_all(contents)
            .map_err(DurableError::io("writing", &path))?;
        self.prepare()
    }

    /// The temp file, to write into.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temp file's path (for error messages).
    pub fn temp_path(&self) -> PathBuf {
        self.dir.display_path(&self.temp)
    }

    /// Sets the final mode and fdatasyncs the contents. [`Staged::commit`]
    /// does it if it was not done; doing it early moves the slow part (and
    /// its errors) before any file becomes visible.
    pub fn prepare(&mut self) -> Result<(), DurableError> {
        if self.prepared {
            return Ok(());
        }
        let path = self.temp_path();
        if let Some(mode) = self.mode {
            self.file
                .set_permissions(Permissions::from_mode(mode))
                .map_err(DurableError::io("setting permissions of", &path))?;
        }
        self.file
            .sync_data()
            .map_err(DurableError::io("syncing", &path))?;
        self.prepared = true;
        Ok(())
    }

    /// Makes the file durable under its destination name: prepare, rename,
    /// fsync the folder. Returns the file, open, at its final name.
    pub fn commit(mut self, replace: Replace) -> Result<File, DurableError> {
        self.prepare()?;
        let dest = self.dir.display_path(&self.dest);
        self.dir
            .rename(
                &self.temp,
                &self.dir,
                &self.dest,
                replace == Replace::Allowed,
            )
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => DurableError::Exists { path: dest.clone() },
                _ => DurableError::io("renaming into place", &dest)(e),
            })?;
        self.committed = true;
        self.dir
            .sync()
            .map_err(DurableError::io("syncing folder", self.dir.path()))?;
        self.file
            .try_clone()
            .map_err(DurableError::io("reopening", &dest))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.dir.remove_file(&self.temp);
        }
    }
}

/// Writes `contents` to `dest` durably and atomically, in one step.
pub fn write_atomically(
    dest: &Path,
    prefix: &str,
    contents: &[u8],
    mode: Option<u32>,
    replace: Replace,
) -> Result<(), DurableError> {
    Staged::with_contents(dest, prefix, contents, mode)?
        .commit(replace)
        .map(drop)
}

/// As [`write_atomically`], for the file `name` in the open folder `dir`.
pub fn write_atomically_in(
    dir: &Folder,
    name: &OsStr,
    prefix: &str,
    contents: &[u8],
    mode: Option<u32>,
    replace: Replace,
) -> Result<(), DurableError> {
    let folder = dir
        .try_clone()
        .map_err(DurableError::io("opening", dir.path()))?;
    let mut staged = Staged::create_in(folder, name, prefix, mode)?;
    staged.write_and_prepare(contents)?;
    staged.commit(replace).map(drop)
}

/// Fsyncs a folder, so that names created, renamed or removed in it
/// survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DurableError::io("syncing folder", dir))
}

/// The folder a file lives in, `.` for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_or_refuses_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("a.txt");
        write_atomically(&dest, ".t-", b"one", None, Replace::Never).expect("first");
        let err = write_atomically(&dest, ".t-", b"two", None, Replace::Never).expect_err("exists");
        assert!(matches!(err, DurableError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&dest).expect("read"), b"one");
        write_atomically(&dest, ".t-", b"three", None, Replace::Allowed).expect("replace");
        assert_eq!(fs::read(&dest).expect("read"), b"three");
        assert_eq!(names(dir.path()), ["a.txt"]);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("pub.pem");
        write_atomically(&dest, ".t-", b"x", Some(0o644), Replace::Never).expect("write");
        let mode = fs::metadata(&dest).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let secret = dir.path().join("key.pem");
        write_atomically(&secret, ".t-", b"k", None, Replace::Never).expect("write");
        let mode = fs::metadata(&secret).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_staged_file_is_invisible_until_committed_and_gone_if_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("serial");
        let staged = Staged::with_contents(&dest, ".t-", b"02\n", None).expect("stage");
        assert!(!dest.exists());
        assert!(staged.temp_path().starts_with(dir.path()));
        drop(staged);
        assert!(names(dir.path()).is_empty());
        let mut staged = Staged::create(&dest, ".t-", None).expect("stage");
        staged.file().write_all(b"03\n").expect("write");
        staged.prepare().expect("prepare");
        staged.commit(Replace::Allowed).expect("commit");
        assert_eq!(fs::read(&dest).expect("read"), b"03\n");
    }

    #[test]
    fn a_missing_folder_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("nope/x");
        let err =
            write_atomically(&dest, ".t-", b"x", None, Replace::Allowed).expect_err("no folder");
        assert!(matches!(err, DurableError::Io { .. }), "{err}");
        assert_eq!(
            err.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
    }
}
