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

pub mod header;
mod layout;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use tempfile::NamedTempFile;

use dimse::uid::{self, Uid};
pub use layout::Layout;

/// Name of the folder of in-flight temp files inside the store.
pub const INCOMING_DIR: &str = ".incoming";
/// Name of the lock file that keeps two servers out of one store.
const LOCK_FILE: &str = ".lock";
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
    incoming: PathBuf,
    _lock: Flock<File>,
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
        fs::create_dir_all(&opts.root)
            .with_context(|| format!("creating store {}", opts.root.display()))?;
        let lock_path = opts.root.join(LOCK_FILE);
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!(
                "store {} is in use by another process ({e})",
                opts.root.display()
            )
        })?;
        let incoming = opts.root.join(INCOMING_DIR);
        fs::create_dir_all(&incoming)
            .with_context(|| format!("creating {}", incoming.display()))?;
        let mut swept = 0;
        for entry in fs::read_dir(&incoming)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())
                    .with_context(|| format!("sweeping {}", entry.path().display()))?;
                swept += 1;
            }
        }
        Ok((
            Store {
                opts: std::sync::RwLock::new(opts),
                incoming,
                _lock: lock,
            },
            swept,
        ))
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
        let st = nix::sys::statvfs::statvfs(&self.options().root).map_err(io::Error::from)?;
        let frag = st.fragment_size() as u64;
        let avail = st.blocks_available() as u64 * frag;
        let total = st.blocks() as u64 * frag;
        let percent = if total == 0 {
            0.0
        } else {
            avail as f64 * 100.0 / total as f64
        };
        Ok((avail, percent))
    }

    fn check_reserve(&self, reserve_percent: u8) -> Result<(), StoreError> {
        if reserve_percent == 0 {
            return Ok(());
        }
        let (_, percent) = self.free_space().map_err(StoreError::io("statvfs"))?;
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
        let mut temp = tempfile::Builder::new()
            .prefix("obj-")
            .suffix(".part")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(&self.incoming)
            .map_err(StoreError::io("creating temp file"))?;
        temp.as_file_mut()
            .write_all(&meta)
            .map_err(StoreError::io("writing file meta"))?;
        Ok(Incoming {
            store: Arc::clone(self),
            opts,
            temp,
            meta_len: meta.len() as u64,
            written: meta.len() as u64,
            flushed_to: 0,
            next_reserve_check: RESERVE_CHECK_STEP,
            sop_class: info.sop_class.clone(),
            sop_instance: info.sop_instance.clone(),
            transfer_syntax: info.transfer_syntax.clone(),
        })
    }
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
    temp: NamedTempFile,
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
        self.temp
            .as_file_mut()
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
                self.temp.as_file(),
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
            self.temp
                .as_file()
                .sync_data()
                .map_err(StoreError::io("fdatasync"))?;
        }
        let relative = match opts.layout {
            Layout::Flat => layout::flat_name(&self.sop_class, &self.sop_instance),
            Layout::Study => {
                let (study, series) = header::study_and_series(
                    self.temp.as_file_mut(),
                    self.meta_len,
                    &self.transfer_syntax,
                );
                layout::study_name(study.as_ref(), series.as_ref(), &self.sop_instance)
            }
        };
        let target = opts.root.join(&relative.path);
        let dir = target.parent().unwrap_or(&opts.root).to_path_buf();
        create_dirs_durably(&opts.root, &dir, opts.fsync)?;
        let final_path = self.persist(&target, &relative.extension)?;
        if opts.fsync {
            fsync_dir(&dir)?;
        }
        Ok(final_path)
    }

    /// Renames the temp file to `target`, or (unless overwriting) to the
    /// first free `target_N` beside it: an existing object is never replaced.
    fn persist(self, target: &Path, extension: &str) -> Result<PathBuf, StoreError> {
        let with_ext = |stem: &Path| -> PathBuf {
            let mut s = stem.as_os_str().to_owned();
            s.push(extension);
            PathBuf::from(s)
        };
        let first = with_ext(target);
        if self.opts.overwrite {
            self.temp.persist(&first).map_err(|e| StoreError::Io {
                what: "renaming into place",
                source: e.error,
            })?;
            return Ok(first);
        }
        let mut temp = self.temp;
        let mut candidate = first;
        for n in 1u32.. {
            match temp.persist_noclobber(&candidate) {
                Ok(_) => return Ok(candidate),
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                    temp = e.file;
                    let mut stem = target.as_os_str().to_owned();
                    stem.push(format!("_{n}"));
                    candidate = with_ext(Path::new(&stem));
                }
                Err(e) => {
                    return Err(StoreError::Io {
                        what: "renaming into place",
                        source: e.error,
                    })
                }
            }
        }
        unreachable!("u32 suffixes exhausted")
    }
}

/// Creates `dir` (inside `root`) and, when durability is on, fsyncs the
/// parent of every folder it had to create, so the new path survives a
/// power cut together with the file in it.
fn create_dirs_durably(root: &Path, dir: &Path, fsync: bool) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while cur != root && !cur.is_dir() {
        missing.push(cur);
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(StoreError::io("creating folder")(e)),
        }
        if fsync {
            fsync_dir(d.parent().unwrap_or(root))?;
        }
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::durable::sync_dir(dir).map_err(|e| StoreError::io("fsync of folder")(e.into_io()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
