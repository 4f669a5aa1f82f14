//! The store: where received objects become durable Part-10 files.
//!
//! Each object is streamed into a temp file under `<store>/.incoming/`
//! (same filesystem, so the final rename is atomic), behind a file meta group
//! built from the C-STORE command and the presentation context; the data set
//! bytes follow exactly as received. On the last fragment the file is
//! fdatasync'ed, renamed to its final name without replacing anything already
//! there, and the directory is fsync'ed. Only then is the object "stored".
//! A temp file is deleted whenever its object fails, and temp files left by
//! a crash are swept when the store opens.
//!
//! Every operation is relative to the store's folder, held open by
//! descriptor ([`Folder`]): the worker gets it from the keeper and never
//! resolves the store's path (see [`crate::handover`]). On the receive
//! path that costs nothing: each `*at` call replaces its path-based form,
//! and the flat layout's folder fsync needs no open at all.

pub mod header;
mod layout;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::dirfd::Folder;
use dimse::uid::{self, Uid};
pub use layout::Layout;

/// Name of the folder of in-flight temp files inside the store.
pub const INCOMING_DIR: &str = ".incoming";
/// Name of the lock file that keeps two servers out of one store.
pub const LOCK_FILE: &str = ".lock";
/// Mode of folders the store creates (less the umask).
const DIR_MODE: u32 = 0o755;
/// Start writeback of what has been written every this many bytes, so the
/// final fdatasync has little left to wait for and dirty pages stay few.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Re-check the free-space reserve every this many bytes of one object.
const RESERVE_CHECK_STEP: u64 = 64 << 20;

/// Why an object could not be stored. Every variant becomes a failure
/// status for that object; none of them ends the association.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Free space is below the configured reserve.
    #[error("free space below the {reserve_percent}% reserve")]
    BelowReserve {
        /// the configured reserve
        reserve_percent: u8,
    },
    /// A write, sync or rename failed (disk full, I/O error, ...).
    #[error("{what}: {source}")]
    Io {
        /// what we were doing
        what: &'static str,
        /// the operating system's error
        source: io::Error,
    },
    /// The file meta group could not be built.
    #[error("file meta group: {0}")]
    Meta(String),
}

impl StoreError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::Io { what, source }
    }
}

/// How the store behaves; see the configuration for each field's meaning.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// the store's root folder
    pub root: PathBuf,
    /// how final names are made
    pub layout: Layout,
    /// fdatasync each object and fsync its folder before success
    pub fsync: bool,
    /// refuse objects while free space is below this percentage
    pub reserve_percent: u8,
    /// replace an object with the same SOP Instance UID instead of keeping both
    pub overwrite: bool,
}

/// An open store. Holds an exclusive lock on the folder for its lifetime.
#[derive(Debug)]
pub struct Store {
    /// Replaceable while serving (except the root); each object keeps the
    /// options it began with.
    opts: std::sync::RwLock<StoreOptions>,
    root: Folder,
    incoming: Folder,
    _lock: Flock<File>,
    /// Free space (percent) under which [`Store::low_space`] is signalled
    /// as objects begin and grow (0: never): retention's threshold, so that
    /// it makes room at once rather than at its next look.
    low_water: std::sync::atomic::AtomicU8,
    low_space: tokio::sync::Notify,
}

/// What the store needs to know about an object before its data set arrives.
#[derive(Debug, Clone)]
pub struct ObjectInfo<'a> {
    /// Affected SOP Class UID of the C-STORE-RQ
    pub sop_class: &'a Uid,
    /// Affected SOP Instance UID of the C-STORE-RQ
    pub sop_instance: &'a Uid,
    /// the presentation context's transfer syntax
    pub transfer_syntax: &'a Uid,
    /// the calling AE title (source of the object)
    pub calling_ae: &'a str,
    /// our AE title
    pub called_ae: &'a str,
}

impl Store {
    /// Opens (creating if needed) the store at `opts.root`, takes its lock
    /// and sweeps temp files left by a crash. Returns the store and the
    /// number of temp files swept.
    pub fn open(opts: StoreOptions) -> anyhow::Result<(Self, usize)> {
        use anyhow::Context;
        let root = Folder::create_all(&opts.root, DIR_MODE)
            .with_context(|| format!("creating store {}", opts.root.display()))?;
        Store::open_in(root, None, opts)
    }

    /// Opens the store in the folder `root` (`opts.root` names it in
    /// messages): takes its lock, or keeps `lock`, the lock file the keeper
    /// already locked (locking it again is a no-op on the same open file);
    /// then makes `.incoming` if needed and sweeps it.
    pub fn open_in(
        root: Folder,
        lock: Option<File>,
        opts: StoreOptions,
    ) -> anyhow::Result<(Self, usize)> {
        use anyhow::Context;
        let lock = match lock {
            Some(file) => file,
            None => open_lock_file(&root)?,
        };
        let lock = take_lock(lock, &root)?;
        let incoming_path = root.display_path(INCOMING_DIR);
        match root.create_dir(INCOMING_DIR, DIR_MODE) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", incoming_path.display()))
            }
        }
        let incoming = root
            .open_dir(INCOMING_DIR)
            .with_context(|| format!("opening {}", incoming_path.display()))?;
        let mut swept = 0;
        let entries = incoming
            .entries()
            .with_context(|| format!("listing {}", incoming_path.display()))?;
        for entry in entries.iter().filter(|e| e.is_file) {
            incoming.remove_file(&entry.name).with_context(|| {
                format!("sweeping {}", incoming.display_path(&entry.name).display())
            })?;
            swept += 1;
        }
        Ok((
            Store {
                opts: std::sync::RwLock::new(opts),
                root,
                incoming,
                _lock: lock,
                low_water: std::sync::atomic::AtomicU8::new(0),
                low_space: tokio::sync::Notify::new(),
            },
            swept,
        ))
    }

    /// The store's folder, by descriptor (the index reads stored files
    /// through it, and opens its database beside them).
    pub fn root(&self) -> &Folder {
        &self.root
    }

    /// The store's options now.
    pub fn options(&self) -> StoreOptions {
        self.opts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes layout, durability, reserve and overwrite for objects that
    /// begin from now on. The root cannot change while serving.
    pub fn set_options(&self, opts: StoreOptions) -> Result<(), &'static str> {
        let mut current = self
            .opts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.root != opts.root {
            return Err("the store folder changes only with a restart");
        }
        *current = opts;
        Ok(())
    }

    /// Free space as (available bytes, percent of the filesystem).
    pub fn free_space(&self) -> io::Result<(u64, f64)> {
        let st = self.root.statvfs()?;
        // The counts are 32 bits wide on armv7.
        #[allow(clippy::unnecessary_cast)]
        let (frag, avail, total) = (
            st.fragment_size() as u64,
            st.blocks_available() as u64,
            st.blocks() as u64,
        );
        let (avail, total) = (avail * frag, total * frag);
        let percent = if total == 0 {
            0.0
        } else {
            avail as f64 * 100.0 / total as f64
        };
        Ok((avail, percent))
    }

    /// Signals [`Store::low_space`] whenever an object begins or grows
    /// while free space is below `percent` (0: never).
    pub fn watch_free_space(&self, percent: u8) {
        self.low_water.store(percent, Ordering::Relaxed);
    }

    /// Signalled when free space is below the [`Store::watch_free_space`]
    /// threshold as an object begins or grows (a permit is kept when nobody
    /// waits).
    pub fn low_space(&self) -> &tokio::sync::Notify {
        &self.low_space
    }

    fn check_reserve(&self, reserve_percent: u8) -> Result<(), StoreError> {
        let low_water = self.low_water.load(Ordering::Relaxed);
        if reserve_percent == 0 && low_water == 0 {
            return Ok(());
        }
        let (_, percent) = self.free_space().map_err(StoreError::io("statvfs"))?;
        if percent < f64::from(low_water) {
            self.low_space.notify_one();
        }
        if percent < f64::from(reserve_percent) {
            return Err(StoreError::BelowReserve { reserve_percent });
        }
        Ok(())
    }

    /// Starts an object: checks the reserve, creates its temp file and
    /// writes the preamble and file meta group. The object holds the store,
    /// so that it can be committed on a blocking thread.
    pub fn begin(self: &Arc<Self>, info: &ObjectInfo<'_>) -> Result<Incoming, StoreError> {
        let opts = self.options();
        self.check_reserve(opts.reserve_percent)?;
        let meta = file_meta(info)?;
        let (file, temp_name) = self
            .incoming
            .create_unique("obj-", ".part", 0o644)
            .map_err(StoreError::io("creating temp file"))?;
        // From here on, dropping the object removes the temp file.
        let mut incoming = Incoming {
            store: Arc::clone(self),
            opts,
            file,
            temp_name: Some(temp_name),
            meta_len: meta.len() as u64,
            written: meta.len() as u64,
            flushed_to: 0,
            next_reserve_check: RESERVE_CHECK_STEP,
            sop_class: info.sop_class.clone(),
            sop_instance: info.sop_instance.clone(),
            transfer_syntax: info.transfer_syntax.clone(),
        };
        incoming
            .file
            .write_all(&meta)
            .map_err(StoreError::io("writing file meta"))?;
        Ok(incoming)
    }
}

/// Opens (creating, mode 0600) the store's lock file.
pub fn open_lock_file(root: &Folder) -> anyhow::Result<File> {
    use anyhow::Context;
    // Read-only: flock(2) needs no write access, and the root keeper,
    // which has no CAP_DAC_OVERRIDE (only CAP_DAC_READ_SEARCH), may open
    // the worker's lock file (made by tmpfiles.d on the device) only for
    // reading. O_CREAT on an existing file asks nothing of the folder.
    root.open_file(
        LOCK_FILE,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
        0o600,
    )
    .with_context(|| format!("opening {}", root.display_path(LOCK_FILE).display()))
}

/// Takes the exclusive lock that keeps a second server out of the store
/// in `root`, without waiting.
pub fn take_lock(file: File, root: &Folder) -> anyhow::Result<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "store {} is in use by another process ({e})",
            root.path().display()
        )
    })
}

/// Builds preamble, `DICM` and the file meta group (0002) for an object.
fn file_meta(info: &ObjectInfo<'_>) -> Result<Vec<u8>, StoreError> {
    let mut builder = dicom_object::meta::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(info.sop_class.as_str())
        .media_storage_sop_instance_uid(info.sop_instance.as_str())
        .transfer_syntax(info.transfer_syntax.as_str())
        .implementation_class_uid(uid::IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(uid::IMPLEMENTATION_VERSION_NAME)
        .receiving_application_entity_title(info.called_ae);
    if !info.calling_ae.is_empty() {
        builder = builder
            .source_application_entity_title(info.calling_ae)
            .sending_application_entity_title(info.calling_ae);
    }
    let table = builder
        .build()
        .map_err(|e| StoreError::Meta(e.to_string()))?;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    table
        .write(&mut out)
        .map_err(|e| StoreError::Meta(e.to_string()))?;
    Ok(out)
}

/// An object being received. Dropping it without [`Incoming::commit`]
/// deletes its temp file: an aborted or failed object leaves nothing behind.
pub struct Incoming {
    store: Arc<Store>,
    opts: StoreOptions,
    file: File,
    /// The temp file's name in `.incoming`; None once it has its final name.
    temp_name: Option<OsString>,
    meta_len: u64,
    written: u64,
    flushed_to: u64,
    next_reserve_check: u64,
    sop_class: Uid,
    sop_instance: Uid,
    transfer_syntax: Uid,
}

impl Incoming {
    /// Appends a data set fragment, exactly as received.
    pub fn write(&mut self, fragment: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(fragment)
            .map_err(StoreError::io("writing data set"))?;
        self.written += fragment.len() as u64;
        if self.written >= self.next_reserve_check {
            self.next_reserve_check = self.written + RESERVE_CHECK_STEP;
            self.store.check_reserve(self.opts.reserve_percent)?;
        }
        if self.opts.fsync && self.written - self.flushed_to >= WRITEBACK_STEP {
            self.start_writeback();
        }
        Ok(())
    }

    /// Asks the kernel to start writing what we wrote so far, without
    /// waiting. (POSIX_FADV_DONTNEED starts writeback of dirty pages in the
    /// range and drops the clean ones: both are what a streaming receiver
    /// on a small board wants.) Advisory: a failure changes nothing. Where
    /// `off_t` is 32 bits (armv7), ranges past 2 GiB get no hint; the final
    /// fdatasync writes them all the same.
    fn start_writeback(&mut self) {
        use nix::libc::off_t;
        if let (Ok(offset), Ok(len)) = (
            off_t::try_from(self.flushed_to),
            off_t::try_from(self.written - self.flushed_to),
        ) {
            let _ = nix::fcntl::posix_fadvise(
                &self.file,
                offset,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        self.flushed_to = self.written;
    }

    /// Data set bytes written so far.
    pub fn data_set_len(&self) -> u64 {
        self.written - self.meta_len
    }

    /// Makes the object durable under its final name and returns that path.
    pub fn commit(mut self) -> Result<PathBuf, StoreError> {
        let opts = self.opts.clone();
        if opts.fsync {
            self.file.sync_data().map_err(StoreError::io("fdatasync"))?;
        }
        let relative = match opts.layout {
            Layout::Flat => layout::flat_name(&self.sop_class, &self.sop_instance),
            Layout::Study => {
                let (study, series) =
                    header::study_and_series(&mut self.file, self.meta_len, &self.transfer_syntax);
                layout::study_name(study.as_ref(), series.as_ref(), &self.sop_instance)
            }
        };
        let name = relative
            .path
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let store = Arc::clone(&self.store);
        let sub;
        let dir = match relative.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            None => &store.root,
            Some(parent) => {
                sub = open_dirs_durably(&store.root, parent, opts.fsync)?;
                &sub
            }
        };
        let final_name = self.persist(dir, &name, &relative.extension)?;
        if opts.fsync {
            dir.sync().map_err(StoreError::io("fsync of folder"))?;
        }
        let mut path = opts.root.join(&relative.path);
        path.set_file_name(final_name);
        Ok(path)
    }

    /// Renames the temp file to `name` in `dir`, or (unless overwriting) to
    /// the first free `name_N` beside it: an existing object is never
    /// replaced (`RENAME_NOREPLACE`). Returns the name it got.
    fn persist(
        &mut self,
        dir: &Folder,
        name: &Path,
        extension: &str,
    ) -> Result<OsString, StoreError> {
        let Some(temp) = self.temp_name.take() else {
            return Err(StoreError::io("renaming into place")(io::Error::other(
                "object already committed",
            )));
        };
        let with_ext = |stem: &Path| -> OsString {
            let mut s = stem.as_os_str().to_owned();
            s.push(extension);
            s
        };
        let mut candidate = with_ext(name);
        for n in 1u32.. {
            match self
                .store
                .incoming
                .rename(&temp, dir, &candidate, self.opts.overwrite)
            {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !self.opts.overwrite => {
                    let mut stem = name.as_os_str().to_owned();
                    stem.push(format!("_{n}"));
                    candidate = with_ext(Path::new(&stem));
                }
                Err(e) => {
                    self.temp_name = Some(temp);
                    return Err(StoreError::io("renaming into place")(e));
                }
            }
        }
        unreachable!("u32 suffixes exhausted")
    }
}

impl Drop for Incoming {
    /// An object that was not committed leaves nothing behind.
    fn drop(&mut self) {
        if let Some(temp) = self.temp_name.take() {
            let _ = self.store.incoming.remove_file(temp);
        }
    }
}

/// Opens the folder `relative` inside `root`, creating what is missing;
/// when durability is on, the parent of every folder it had to create is
/// fsynced, so the new path survives a power cut together with the file
/// in it.
fn open_dirs_durably(root: &Folder, relative: &Path, fsync: bool) -> Result<Folder, StoreError> {
    match root.open_dir(relative) {
        Ok(dir) => return Ok(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("opening folder")(e)),
    }
    let mut so_far = PathBuf::new();
    for part in relative.components() {
        let parent = so_far.clone();
        so_far.push(part);
        match root.create_dir(&so_far, DIR_MODE) {
            Ok(()) => {
                if fsync {
                    let synced = if parent.as_os_str().is_empty() {
                        root.sync()
                    } else {
                        root.open_dir(&parent).and_then(|d| d.sync())
                    };
                    synced.map_err(StoreError::io("fsync of folder"))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io("creating folder")(e)),
        }
    }
    root.open_dir(relative)
        .map_err(StoreError::io("opening folder"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn uid(s: &str) -> Uid {
        Uid::new(s).expect("valid uid")
    }

    fn open(dir: &Path, layout: Layout, overwrite: bool) -> Arc<Store> {
        let (store, _) = Store::open(StoreOptions {
            root: dir.to_path_buf(),
            layout,
            fsync: true,
            reserve_percent: 0,
            overwrite,
        })
        .expect("opens");
        Arc::new(store)
    }

    #[test]
    fn duplicates_are_kept_beside_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Layout::Flat, false);
        let (class, inst, ts) = (
            uid("1.2.840.10008.5.1.4.1.1.2"),
            uid("1.2.3"),
            uid("1.2.840.10008.1.2.1"),
        );
        let info = ObjectInfo {
            sop_class: &class,
            sop_instance: &inst,
            transfer_syntax: &ts,
            calling_ae: "SCU",
            called_ae: "MINIPACS",
        };
        let mut paths = Vec::new();
        for body in [b"first".as_slice(), b"second"] {
            let mut obj = store.begin(&info).expect("begins");
            obj.write(body).expect("writes");
            paths.push(obj.commit().expect("commits"));
        }
        assert_eq!(paths[0], dir.path().join("CT.1.2.3"));
        assert_eq!(paths[1], dir.path().join("CT.1.2.3_1"));
        let first = fs::read(&paths[0]).expect("reads");
        assert!(first.ends_with(b"first"));
        assert_eq!(&first[128..132], b"DICM");
    }

    #[test]
    fn dropped_object_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Layout::Flat, false);
        let (class, inst, ts) = (uid("1.2.840.10008.5.1.4.1.1.2"), uid("1.2.3"), uid("1.2"));
        let info = ObjectInfo {
            sop_class: &class,
            sop_instance: &inst,
            transfer_syntax: &ts,
            calling_ae: "",
            called_ae: "MINIPACS",
        };
        let mut obj = store.begin(&info).expect("begins");
        obj.write(b"partial").expect("writes");
        drop(obj);
        let incoming: Vec<_> = fs::read_dir(dir.path().join(INCOMING_DIR))
            .expect("lists")
            .collect();
        assert!(incoming.is_empty());
    }

    #[test]
    fn second_server_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _store = open(dir.path(), Layout::Flat, false);
        assert!(Store::open(StoreOptions {
            root: dir.path().to_path_buf(),
            layout: Layout::Flat,
            fsync: false,
            reserve_percent: 0,
            overwrite: false,
        })
        .is_err());
    }

    #[test]
    fn crash_leftovers_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(INCOMING_DIR)).expect("mkdir");
        fs::write(dir.path().join(INCOMING_DIR).join("obj-x.part"), b"junk").expect("write");
        let (_store, swept) = Store::open(StoreOptions {
            root: dir.path().to_path_buf(),
            layout: Layout::Flat,
            fsync: false,
            reserve_percent: 0,
            overwrite: false,
        })
        .expect("opens");
        assert_eq!(swept, 1);
    }
}
