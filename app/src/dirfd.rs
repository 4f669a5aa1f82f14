//! A folder held by an open descriptor, and the file operations relative to
//! it (`openat`, `mkdirat`, `renameat2`, `unlinkat`, `fstatvfs`, `fsync`).
//!
//! Started as root, the keeper opens the store and log folders and hands
//! the worker their descriptors (see [`crate::handover`]): the worker then
//! reaches those folders without resolving their paths, so a parent it
//! cannot traverse (a 0700 home, `/root`) does not matter, and it holds no
//! way to name anything else of the filesystem. The single process opens
//! its folders itself and runs the same code. The path a folder was opened
//! at is kept for messages only; nothing is ever looked up by it again.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// An open folder and the path it was opened at (for messages).
#[derive(Debug)]
pub struct Folder {
    fd: OwnedFd,
    path: PathBuf,
}

/// One entry of a folder, as [`Folder::entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// the entry's name in the folder
    pub name: OsString,
    /// whether it is a regular file (symbolic links are not)
    pub is_file: bool,
    /// whether it is a folder (symbolic links are not)
    pub is_dir: bool,
}

/// The flags every directory descriptor is opened with.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

impl Folder {
    /// Opens the folder at `path` (which must exist).
    pub fn open(path: &Path) -> io::Result<Folder> {
        let fd = nix::fcntl::open(path, dir_flags(), Mode::empty())?;
        Ok(Folder {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates the folder at `path` (and its missing parents, `mode` less
    /// the umask) if needed, and opens it.
    pub fn create_all(path: &Path, mode: u32) -> io::Result<Folder> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)?;
        Folder::open(path)
    }

    /// Takes a descriptor opened elsewhere (inherited from the keeper),
    /// after checking that it is a folder. `path` is for messages.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> io::Result<Folder> {
        let stat = nix::sys::stat::fstat(&fd)?;
        if !is_kind(&stat, SFlag::S_IFDIR) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor for {} is not a folder", path.display()),
            ));
        }
        Ok(Folder { fd, path })
    }

    /// A second descriptor of the same folder.
    pub fn try_clone(&self) -> io::Result<Folder> {
        Ok(Folder {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// The path the folder was opened at (for messages only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name`'s path under the folder's (for messages only).
    pub fn display_path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The folder's own status (owner, mode).
    pub fn stat(&self) -> io::Result<FileStat> {
        Ok(nix::sys::stat::fstat(&self.fd)?)
    }

    /// The status of `name` in the folder, not following a final symbolic
    /// link; None if there is no such entry.
    pub fn stat_at(&self, name: impl AsRef<Path>) -> io::Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(
            &self.fd,
            name.as_ref(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => Ok(Some(stat)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the file `name` in the folder with `flags` (O_CLOEXEC is
    /// always added) and, if it is created, `mode` less the umask.
    pub fn open_file(&self, name: impl AsRef<Path>, flags: OFlag, mode: u32) -> io::Result<File> {
        let fd = nix::fcntl::openat(
            &self.fd,
            name.as_ref(),
            flags | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Creates a new file named `prefix`, six random characters and
    /// `suffix`, open for reading and writing with `mode` (less the
    /// umask); another name is tried if one is taken.
    pub fn create_unique(
        &self,
        prefix: &str,
        suffix: &str,
        mode: u32,
    ) -> io::Result<(File, OsString)> {
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
        let mut tries = 0;
        loop {
            let mut name = String::with_capacity(prefix.len() + 6 + suffix.len());
            name.push_str(prefix);
            name.extend(std::iter::repeat_with(fastrand::alphanumeric).take(6));
            name.push_str(suffix);
            match self.open_file(&name, flags, mode) {
                Ok(file) => return Ok((file, name.into())),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the sub-folder `name` (which may have several components).
    pub fn open_dir(&self, name: impl AsRef<Path>) -> io::Result<Folder> {
        let name = name.as_ref();
        let fd = nix::fcntl::openat(&self.fd, name, dir_flags(), Mode::empty())?;
        Ok(Folder {
            fd,
            path: self.path.join(name),
        })
    }

    /// Creates the sub-folder `name` with `mode` (less the umask).
    pub fn create_dir(&self, name: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        Ok(nix::sys::stat::mkdirat(
            &self.fd,
            name.as_ref(),
            Mode::from_bits_truncate(mode),
        )?)
    }

    /// Renames `from` (in this folder) to `to` in `to_dir`, atomically:
    /// with `replace` an existing `to` is replaced, without it the rename
    /// fails with `AlreadyExists` (`RENAME_NOREPLACE`) and nothing changes.
    pub fn rename(
        &self,
        from: impl AsRef<Path>,
        to_dir: &Folder,
        to: impl AsRef<Path>,
        replace: bool,
    ) -> io::Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        if replace {
            nix::fcntl::renameat(&self.fd, from, &to_dir.fd, to)?;
        } else {
            nix::fcntl::renameat2(
                &self.fd,
                from,
                &to_dir.fd,
                to,
                RenameFlags::RENAME_NOREPLACE,
            )?;
        }
        Ok(())
    }

    /// Removes the file `name` from the folder.
    pub fn remove_file(&self, name: impl AsRef<Path>) -> io::Result<()> {
        Ok(nix::unistd::unlinkat(
            &self.fd,
            name.as_ref(),
            UnlinkatFlags::NoRemoveDir,
        )?)
    }

    /// Removes the folder `name` (relative to this one), which must be
    /// empty.
    pub fn remove_dir(&self, name: impl AsRef<Path>) -> io::Result<()> {
        Ok(nix::unistd::unlinkat(
            &self.fd,
            name.as_ref(),
            UnlinkatFlags::RemoveDir,
        )?)
    }

    /// The folder's entries (not `.` and `..`).
    ///
    /// Read with `getdents64` (rustix), not glibc's `readdir`: on a 32-bit
    /// target `readdir` has a 32-bit `d_off` and fails with EOVERFLOW when
    /// the filesystem's directory cookies are 64-bit hashes (ext4 does this;
    /// a 32-bit Pi OS on a 64-bit kernel, or qemu-arm, shows it).
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.for_each_entry(|entry| {
            out.push(entry);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `each` with every entry of the folder (not `.` and `..`), read
    /// as they come: unlike [`Folder::entries`] nothing is collected, so a
    /// folder of 100,000 objects costs one read buffer (the index's walk of
    /// the store). Entries added or removed meanwhile may or may not be seen.
    pub fn for_each_entry(&self, mut each: impl FnMut(Entry) -> io::Result<()>) -> io::Result<()> {
        let mut dir = rustix::fs::Dir::read_from(&self.fd)?;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = entry.file_type();
            let name = name.to_os_string();
            let (is_file, is_dir) = match kind {
                rustix::fs::FileType::RegularFile => (true, false),
                rustix::fs::FileType::Directory => (false, true),
                // The filesystem did not say (DT_UNKNOWN): ask.
                rustix::fs::FileType::Unknown => match self.stat_at(&name)? {
                    Some(s) => (is_kind(&s, SFlag::S_IFREG), is_kind(&s, SFlag::S_IFDIR)),
                    None => (false, false),
                },
                _ => (false, false),
            };
            each(Entry {
                name,
                is_file,
                is_dir,
            })?;
        }
        Ok(())
    }

    /// The descriptor's path in `/proc/self/fd`: a name for the folder that
    /// this process can always resolve, whoever may traverse its real path
    /// (the worker may not: see the module's doc). For libraries that take
    /// only paths (SQLite).
    pub fn proc_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Fsyncs the folder, so that names created, renamed or removed in it
    /// survive a power cut.
    pub fn sync(&self) -> io::Result<()> {
        Ok(nix::unistd::fsync(&self.fd)?)
    }

    /// The filesystem's space, as `fstatvfs` reports it.
    pub fn statvfs(&self) -> io::Result<nix::sys::statvfs::Statvfs> {
        Ok(nix::sys::statvfs::fstatvfs(&self.fd)?)
    }
}

impl AsFd for Folder {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether `stat` is of the kind `kind` (S_IFDIR, S_IFREG, ...).
pub fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn relative_operations_work_without_the_path() {
        let top = tempfile::tempdir().expect("tempdir");
        let path = top.path().join("store");
        let folder = Folder::create_all(&path, 0o755).expect("create");
        // Moved away: the descriptor still reaches it, the path does not.
        let moved = top.path().join("elsewhere");
        std::fs::rename(&path, &moved).expect("move");
        let (mut file, name) = folder.create_unique("t-", ".part", 0o644).expect("temp");
        file.write_all(b"hello").expect("write");
        folder.create_dir("sub", 0o755).expect("mkdir");
        let sub = folder.open_dir("sub").expect("open sub");
        folder.rename(&name, &sub, "final", false).expect("rename");
        let (_, other) = folder.create_unique("t-", "", 0o644).expect("temp");
        let err = folder
            .rename(&other, &sub, "final", false)
            .expect_err("never replaces");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        folder
            .rename(&other, &sub, "final", true)
            .expect("replaces");
        sub.sync().expect("fsync");
        assert!(folder.statvfs().expect("statvfs").blocks() > 0);
        let mut names: Vec<_> = folder.entries().expect("entries");
        names.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            names,
            [Entry {
                name: "sub".into(),
                is_file: false,
                is_dir: true
            }]
        );
        assert_eq!(
            sub.entries().expect("entries"),
            [Entry {
                name: "final".into(),
                is_file: true,
                is_dir: false
            }]
        );
        let mut text = String::new();
        File::open(moved.join("sub/final"))
            .expect("open")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "");
        sub.remove_file("final").expect("unlink");
        assert!(sub.stat_at("final").expect("stat").is_none());
        assert!(Folder::from_fd(file.into(), "x".into()).is_err());
    }
}
