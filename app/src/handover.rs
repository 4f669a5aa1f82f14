//! The folders a service works in, and how the root keeper hands them to
//! the worker: as open descriptors, never as paths, and never by taking a
//! folder from its owner.
//!
//! The keeper (root) binds first, then takes the store's lock, and only
//! then prepares anything, so a start that fails (the port is taken, the
//! store is in use) changes nothing on disk. A folder that is new (made
//! here) or already belongs to the worker's user is prepared for it: what
//! the worker must write (the folder, `.incoming`, `.lock`, its log files)
//! is given to the worker's user where it cannot write it yet. A folder
//! that belongs to another user is used as it is when the worker can write
//! to it; otherwise the service refuses to start and says whose it is and
//! what would fix it. Every change of ownership is logged.
//!
//! The worker gets the descriptors over exec (see [`crate::privsep`]) and
//! works relative to them ([`crate::dirfd`]), so a parent it cannot
//! traverse does not matter, and it holds no way to name anything else.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, Flock};
use nix::unistd::{Gid, Uid, User};

use crate::config::Config;
use crate::dirfd::Folder;
use crate::store::{INCOMING_DIR, LOCK_FILE};

/// Who the worker runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// user ID
    pub uid: Uid,
    /// group ID
    pub gid: Gid,
}

/// Mode of a store folder made here (less the umask).
const STORE_DIR_MODE: u32 = 0o755;
/// Mode of a log folder made here (less the umask).
const LOG_DIR_MODE: u32 = 0o750;

/// The folders a service works in, open.
#[derive(Debug)]
pub struct Folders {
    /// the store's folder
    pub store: Folder,
    /// the store's lock file, already locked by the keeper; None when the
    /// store takes its lock itself (the single process)
    pub store_lock: Option<File>,
    /// the log folder; None when it could not be opened (the single
    /// process then logs to stderr only)
    pub logs: Option<Folder>,
}

impl Folders {
    /// Opens the folders of `config` for a service that runs as the user
    /// who started it (the single process): made if missing, used as they
    /// are. A log folder that cannot be opened costs the file logs only.
    pub fn open_own(config: &Config) -> anyhow::Result<Folders> {
        use anyhow::Context;
        let store = Folder::create_all(&config.output_directory, STORE_DIR_MODE)
            .with_context(|| format!("creating store {}", config.output_directory.display()))?;
        let logs = match Folder::create_all(&config.log_directory, LOG_DIR_MODE) {
            Ok(folder) => Some(folder),
            Err(e) => {
                tracing::warn!(dir = %config.log_directory.display(), error = %e,
                    "log folder unavailable; logging to stderr only, no audit trail");
                None
            }
        };
        Ok(Folders {
            store,
            store_lock: None,
            logs,
        })
    }
}

/// Why the keeper will not hand a folder over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The folder (or what the worker must write in it) belongs to another
    /// user and the worker cannot write to it.
    #[error(
        "{what} {} belongs to user {owner} (mode {mode:04o}) and the worker runs as user {worker}, \
         who cannot write to it; nothing was changed. {fixes}",
        path.display()
    )]
    NotWritable {
        /// "store folder", "log folder", "file"
        what: &'static str,
        /// the folder or file
        path: PathBuf,
        /// its owner's name (or uid)
        owner: String,
        /// the worker's user's name (or uid)
        worker: String,
        /// its permission bits
        mode: u32,
        /// what would fix it
        fixes: String,
    },
    /// The store's lock could not be taken (another server has it).
    #[error("{0}")]
    Store(String),
    /// Something is there that is not a folder.
    #[error("{} is not a folder", path.display())]
    NotAFolder {
        /// the path
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// what was being done
        what: &'static str,
        /// the file or folder
        path: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> HandoverError + 'p {
    move |source| HandoverError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The worker's folders as the keeper prepared them.
#[derive(Debug)]
pub struct Handed {
    /// the store's folder
    pub store: Folder,
    /// the store's lock, held by the keeper for its lifetime; the worker
    /// gets a second descriptor of the same open file (so the same lock)
    pub lock: Flock<File>,
    /// the log folder
    pub logs: Folder,
    /// what was changed on disk, to be logged once the keeper's file log
    /// is open
    pub changes: Vec<String>,
}

/// Whose a folder is, as far as the worker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not there yet: made here, for the worker.
    New,
    /// The worker's user's already.
    Workers,
    /// Another user's: used as it is, if the worker can write to it.
    Others,
}

/// Prepares the store and log folders of `config` for a worker running as
/// `who`: both are checked first (a refusal changes nothing), then the
/// store is made if new and locked before anything in it changes, then
/// the log folder is prepared. Call after the ports are bound.
pub fn prepare(config: &Config, who: Identity) -> Result<Handed, HandoverError> {
    let mut changes = Vec::new();
    let store_path = &config.output_directory;
    let store_fix = "--output-directory DIR";
    let standing = standing_of(store_path, "store folder", who, store_fix)?;
    if standing == Standing::Others {
        // Checked before anything is made: a refusal changes nothing.
        check_writable(
            &store_path.join(INCOMING_DIR),
            "folder",
            who,
            store_fix,
            false,
        )?;
    }
    let log_path = &config.log_directory;
    let log_fix = "log_directory = \"DIR\" in the configuration";
    let log_standing = standing_of(log_path, "log folder", who, log_fix)?;
    if log_standing == Standing::Others {
        // The worker must be able to write, rotate and replace its files.
        if let Ok(entries) = std::fs::read_dir(log_path) {
            let sticky = std::fs::metadata(log_path).is_ok_and(|m| m.mode() & 0o1000 != 0);
            for entry in entries.flatten() {
                if crate::logs::is_worker_file(&entry.file_name().to_string_lossy()) {
                    check_writable(&entry.path(), "file", who, log_fix, sticky)?;
                }
            }
        }
    }
    // Checked: from here on, things change.
    let store = open_folder(store_path, standing, STORE_DIR_MODE, who, &mut changes)?;
    let had_lock = store
        .stat_at(LOCK_FILE)
        .map_err(io_err("looking at", &store.display_path(LOCK_FILE)))?
        .is_some();
    let lock = crate::store::open_lock_file(&store)
        .and_then(|file| crate::store::take_lock(file, &store))
        .map_err(|e| HandoverError::Store(format!("{e:#}")))?;
    // Locked: from here on no other server uses this store.
    if !had_lock {
        give(&store, LOCK_FILE, who, "made", &mut changes)?;
    }
    for name in [INCOMING_DIR, LOCK_FILE] {
        let Some(stat) = store
            .stat_at(name)
            .map_err(io_err("looking at", &store.display_path(name)))?
        else {
            if name == INCOMING_DIR {
                store
                    .create_dir(INCOMING_DIR, STORE_DIR_MODE)
                    .map_err(io_err("creating", &store.display_path(INCOMING_DIR)))?;
                give(&store, INCOMING_DIR, who, "made", &mut changes)?;
            }
            continue;
        };
        let meta = Bits::of_stat(&stat);
        if standing != Standing::Others && !meta.writable_by(who) {
            give(&store, name, who, "given", &mut changes)?;
        }
    }

    let logs = open_folder(log_path, log_standing, LOG_DIR_MODE, who, &mut changes)?;
    if log_standing != Standing::Others {
        let entries = logs.entries().map_err(io_err("listing", logs.path()))?;
        for entry in entries.iter().filter(|e| e.is_file) {
            let name = entry.name.to_string_lossy();
            if !crate::logs::is_worker_file(&name) {
                continue;
            }
            let path = logs.display_path(&entry.name);
            if let Some(stat) = logs
                .stat_at(&entry.name)
                .map_err(io_err("looking at", &path))?
            {
                if !Bits::of_stat(&stat).writable_by(who) {
                    give(&logs, &entry.name, who, "given", &mut changes)?;
                }
            }
        }
    }
    Ok(Handed {
        store,
        lock,
        logs,
        changes,
    })
}

/// Looks at `path`: missing, the worker's, or another user's (and then
/// refuses unless the worker can write to it).
fn standing_of(
    path: &Path,
    what: &'static str,
    who: Identity,
    fix: &'static str,
) -> Result<Standing, HandoverError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Standing::New),
        Err(e) => return Err(io_err("looking at", path)(e)),
    };
    if !meta.is_dir() {
        return Err(HandoverError::NotAFolder {
            path: path.to_path_buf(),
        });
    }
    if meta.uid() == who.uid.as_raw() {
        return Ok(Standing::Workers);
    }
    check_writable(path, what, who, fix, false)?;
    Ok(Standing::Others)
}

/// Refuses, naming owner, worker and fixes, if the worker cannot write to
/// `path` (if it exists). With `sticky` (the folder holding it has the
/// sticky bit), writing is not enough: only its owner may rename it.
fn check_writable(
    path: &Path,
    what: &'static str,
    who: Identity,
    fix: &'static str,
    sticky: bool,
) -> Result<(), HandoverError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("looking at", path)(e)),
    };
    let bits = Bits {
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    };
    if bits.writable_by(who) && (!sticky || bits.uid == who.uid.as_raw()) {
        return Ok(());
    }
    let (owner, worker) = (user_name(Uid::from_raw(bits.uid)), user_name(who.uid));
    // The worker never runs as root: for a folder of root's, the fix is
    // to give it to the worker's user, or to use another.
    let fixes = if bits.uid == 0 {
        format!(
            "Give it to the worker's user (chown {worker} {}), or give minipacs a {what} of \
             its own ({fix})",
            path.display()
        )
    } else {
        format!("Start with --user {owner}, or give minipacs a {what} of its own ({fix})")
    };
    Err(HandoverError::NotWritable {
        what,
        path: path.to_path_buf(),
        owner,
        worker,
        mode: bits.mode & 0o7777,
        fixes,
    })
}

/// Opens the folder at `path`, making it first (for the worker) if new.
fn open_folder(
    path: &Path,
    standing: Standing,
    mode: u32,
    who: Identity,
    changes: &mut Vec<String>,
) -> Result<Folder, HandoverError> {
    if standing != Standing::New {
        return Folder::open(path).map_err(io_err("opening", path));
    }
    let folder = Folder::create_all(path, mode).map_err(io_err("creating", path))?;
    nix::unistd::fchown(&folder, Some(who.uid), Some(who.gid))
        .map_err(|e| io_err("giving to the worker", path)(e.into()))?;
    changes.push(format!(
        "made {} for user {}",
        path.display(),
        user_name(who.uid)
    ));
    Ok(folder)
}

/// Gives `name` in `dir` to the worker's user, and notes it.
fn give(
    dir: &Folder,
    name: impl AsRef<Path>,
    who: Identity,
    how: &str,
    changes: &mut Vec<String>,
) -> Result<(), HandoverError> {
    let name = name.as_ref();
    let path = dir.display_path(name);
    let before = dir
        .stat_at(name)
        .map_err(io_err("looking at", &path))?
        .map(|s| user_name(Uid::from_raw(s.st_uid)));
    nix::unistd::fchownat(
        dir,
        name,
        Some(who.uid),
        Some(who.gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io_err("giving to the worker", &path)(e.into()))?;
    changes.push(match (how, before) {
        ("made", _) | (_, None) => {
            format!("made {} for user {}", path.display(), user_name(who.uid))
        }
        (_, Some(owner)) => format!(
            "gave {} (owned by {owner}) to user {}",
            path.display(),
            user_name(who.uid)
        ),
    });
    Ok(())
}

/// Owner, group and mode, for the permission check.
#[derive(Debug, Clone, Copy)]
struct Bits {
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Bits {
    fn of_stat(stat: &nix::sys::stat::FileStat) -> Bits {
        Bits {
            mode: stat.st_mode,
            uid: stat.st_uid,
            gid: stat.st_gid,
        }
    }

    /// Whether `who` may write here by the permission bits that apply to
    /// it (owner, else group, else others): the worker's groups are
    /// exactly its one group (see [`crate::privsep::drop_privileges`]).
    fn writable_by(&self, who: Identity) -> bool {
        if self.uid == who.uid.as_raw() {
            self.mode & 0o200 != 0
        } else if self.gid == who.gid.as_raw() {
            self.mode & 0o020 != 0
        } else {
            self.mode & 0o002 != 0
        }
    }
}

/// A user's name, or its number if it has none.
fn user_name(uid: Uid) -> String {
    match User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Gid;

    #[test]
    fn the_worker_writes_through_its_owner_or_group_or_other_bits() {
        let me = Identity {
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
        };
        let bits = |mode, uid, gid| Bits { mode, uid, gid };
        // The log folder: root:minipacs 1770, the worker in via its group.
        assert!(bits(0o1770, 0, 1000).writable_by(me));
        assert!(!bits(0o750, 0, 1000).writable_by(me));
        // Its own.
        assert!(bits(0o700, 1000, 5).writable_by(me));
        assert!(!bits(0o500, 1000, 5).writable_by(me));
        // Owner bits decide for the owner, even if the group's would allow.
        assert!(!bits(0o570, 1000, 1000).writable_by(me));
        // The founding article's store: another user's, 0755.
        assert!(!bits(0o755, 1001, 1001).writable_by(me));
        assert!(bits(0o777, 1001, 1001).writable_by(me));
    }

    #[test]
    fn the_refusal_names_the_folder_its_owner_the_worker_and_the_fixes() {
        let e = HandoverError::NotWritable {
            what: "store folder",
            path: "/reserve/playground/pacs".into(),
            owner: "gabriel".into(),
            worker: "minipacs".into(),
            mode: 0o755,
            fixes: "Start with --user gabriel, or give minipacs a store folder of its own \
                    (--output-directory DIR)"
                .into(),
        };
        assert_eq!(
            e.to_string(),
            "store folder /reserve/playground/pacs belongs to user gabriel (mode 0755) and the \
             worker runs as user minipacs, who cannot write to it; nothing was changed. Start \
             with --user gabriel, or give minipacs a store folder of its own (--output-directory DIR)"
        );
    }
}
