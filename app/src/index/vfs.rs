//! The SQLite VFS the index is opened with: the stock `unix` VFS, except
//! that a database's path is taken as given instead of being resolved.
//!
//! Why: the privilege-separated worker holds the store only as a
//! descriptor and may be unable to traverse the store's path (a 0700
//! parent; see [`crate::dirfd`]). It opens the index as
//! `/proc/self/fd/N/index.sqlite`, which the kernel resolves through the
//! descriptor. The stock VFS's `xFullPathname` would first resolve every
//! symbolic link in that path with `lstat` and `readlink`, turning the
//! `/proc/self/fd/N` link back into the store's real path, whose every
//! ancestor it then `lstat`s: EACCES, "unable to open database file".
//! SQLite derives the `-wal` and `-shm` names from the full pathname, so
//! with the path kept as given they too are reached through the descriptor.
//! Locks are POSIX locks on the inode, so another process reading the same
//! files by their real path (a reader, a test) shares them correctly.

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The VFS's name.
pub const NAME: &CStr = c"minipacs-fd";

/// Registers the VFS (once per process) and returns its name.
pub fn name() -> Result<&'static CStr, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // Let rusqlite initialise SQLite its way (threading mode) first.
            rusqlite::Connection::open_in_memory().map_err(|e| e.to_string())?;
            register()
        })
        .clone()
        .map(|()| NAME)
}

#[allow(unsafe_code)]
fn register() -> Result<(), String> {
    // SAFETY: sqlite3_vfs_find returns SQLite's own static `unix` VFS (or
    // null, checked), valid for the process's life. The copy keeps its
    // methods and its pAppData (the locking-style finder those methods
    // read), changes the name, the list link and xFullPathname, and is
    // leaked, so it outlives every connection, as sqlite3_vfs_register
    // requires. It is registered once (OnceLock) and never unregistered.
    unsafe {
        let unix = ffi::sqlite3_vfs_find(c"unix".as_ptr());
        if unix.is_null() {
            return Err("SQLite has no unix VFS".into());
        }
        let mut vfs: ffi::sqlite3_vfs = std::ptr::read(unix);
        vfs.zName = NAME.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xFullPathname = Some(full_pathname);
        let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0);
        if rc != ffi::SQLITE_OK {
            return Err(format!("registering the SQLite VFS: error {rc}"));
        }
    }
    Ok(())
}

/// `xFullPathname`: an absolute path as it is; anything else refused (the
/// index is always opened by an absolute path).
#[allow(unsafe_code)]
unsafe extern "C" fn full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    if name.is_null() || out.is_null() {
        return ffi::SQLITE_CANTOPEN;
    }
    // SAFETY: SQLite passes a NUL-terminated name and an output buffer of
    // n_out bytes (checked against the name's length with its NUL).
    unsafe {
        let name = CStr::from_ptr(name).to_bytes_with_nul();
        let fits = usize::try_from(n_out).is_ok_and(|n| name.len() <= n);
        if !fits || name.first() != Some(&b'/') {
            return ffi::SQLITE_CANTOPEN;
        }
        std::ptr::copy_nonoverlapping(name.as_ptr().cast::<c_char>(), out, name.len());
    }
    ffi::SQLITE_OK
}
