//! A read-only SQLite VFS that serves a database from a [`PageImage`], so SQLite reads a
//! backup in place: the pages a query touches are fetched, nothing else.
//!
//! All of timevault's `unsafe` FFI for it is in this file. The VFS (`timevault-pages`) is
//! registered once with the process's SQLite (the one sqlx links; libsqlite3-sys is shared).
//! An image is exposed under a unique path; SQLite's open of that path as the main database
//! finds the image in a registry; any other file SQLite opens through this VFS (temporary
//! files for sorting) goes to the default VFS. The file is immutable: connect with
//! `immutable=1` and read-only, so SQLite takes no locks and opens no journal or WAL; writes
//! are refused. A failed page read returns `SQLITE_IOERR_READ` and the error itself is kept on
//! the image ([`PageImage::explain`]) for the caller.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use libsqlite3_sys as ffi;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;

use super::pages::PageImage;
use crate::error::{Error, Result};

/// The VFS's registered name.
pub const VFS_NAME: &str = "timevault-pages";
const VFS_NAME_C: &CStr = c"timevault-pages";
/// Paths of exposed images start with this.
const PREFIX: &str = "/timevault-pages/";

/// Images SQLite may open, by exposed path.
fn images() -> &'static Mutex<HashMap<String, Arc<PageImage>>> {
    static IMAGES: OnceLock<Mutex<HashMap<String, Arc<PageImage>>>> = OnceLock::new();
    IMAGES.get_or_init(Default::default)
}

/// An image exposed to SQLite under [`Exposed::path`]; withdrawn on drop.
pub struct Exposed {
    path: String,
}

impl Exposed {
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        images()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.path);
    }
}

/// Register the VFS (once) and expose `image` under a new path.
pub fn expose(image: Arc<PageImage>) -> Result<Exposed> {
    register()?;
    let path = format!("{PREFIX}{}.db", uuid::Uuid::new_v4().simple());
    images()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.clone(), image);
    Ok(Exposed { path })
}

/// A read-only connection to `image`; keep the [`Exposed`] alive while it is used.
pub async fn connect(image: Arc<PageImage>) -> Result<(SqliteConnection, Exposed)> {
    let exposed = expose(image.clone())?;
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| Error::other(e.to_string()))?
        .filename(exposed.path())
        .vfs(VFS_NAME)
        .immutable(true)
        .read_only(true)
        .create_if_missing(false);
    let conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| {
            image.explain(Error::other(format!(
                "opening {} in place: {e}",
                image.source()
            )))
        })?;
    Ok((conn, exposed))
}

/// The file SQLite allocates (`szOsFile` bytes) for a database opened through this VFS.
#[repr(C)]
struct ImageFile {
    base: ffi::sqlite3_file,
    /// From `Arc::into_raw`; released in `x_close`.
    image: *const PageImage,
}

fn register() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(register_once)
        .clone()
        .map_err(|e| Error::other(format!("registering the SQLite VFS {VFS_NAME}: {e}")))
}

fn register_once() -> std::result::Result<(), String> {
    // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, which SQLite keeps alive for the
    // life of the process; we only read it here.
    let default = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
    if default.is_null() {
        return Err("SQLite has no default VFS".into());
    }
    // SAFETY: `default` is a valid, never-freed VFS (checked non-null above).
    let mut vfs = unsafe { *default };
    vfs.pNext = std::ptr::null_mut();
    vfs.zName = VFS_NAME_C.as_ptr();
    vfs.szOsFile = vfs.szOsFile.max(std::mem::size_of::<ImageFile>() as c_int);
    vfs.xOpen = Some(x_open);
    vfs.xAccess = Some(x_access);
    vfs.xFullPathname = Some(x_full_pathname);
    // The remaining methods (randomness, time, sleep, temporary files' deletion) are the
    // default VFS's own and see its pAppData, copied above.
    let vfs = Box::leak(Box::new(vfs));
    let _ = DEFAULT.set(default as usize);
    // SAFETY: `vfs` is leaked, so it outlives every connection; registering is thread-safe
    // in SQLite and happens once (OnceLock).
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_vfs_register returned {rc}"));
    }
    Ok(())
}

/// The default VFS (for files that are not exposed images).
static DEFAULT: OnceLock<usize> = OnceLock::new();

fn default_vfs() -> *mut ffi::sqlite3_vfs {
    *DEFAULT.get().expect("registered before use") as *mut ffi::sqlite3_vfs
}

/// The exposed path `name` names, if it is one of ours.
///
/// SAFETY: `name` must be NULL or a NUL-terminated string valid for the call.
unsafe fn our_path(name: *const c_char) -> Option<String> {
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated per the caller's contract.
    let name = unsafe { CStr::from_ptr(name) }.to_str().ok()?;
    name.starts_with(PREFIX).then(|| name.to_string())
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes NULL or a valid filename.
    let path = unsafe { our_path(name) };
    if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 || path.is_none() {
        let default = default_vfs();
        // SAFETY: `file` has room for the default VFS's file (szOsFile is the larger of the
        // two); the default VFS's xOpen is called with its own VFS pointer.
        return unsafe {
            ((*default).xOpen.expect("default xOpen"))(default, name, file, flags, out_flags)
        };
    }
    let image = images()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&path.expect("checked above"))
        .cloned();
    let Some(image) = image else {
        return ffi::SQLITE_CANTOPEN;
    };
    let ours = file as *mut ImageFile;
    // SAFETY: SQLite allocated `file` with szOsFile >= size_of::<ImageFile>() bytes, suitably
    // aligned, for us to initialise; pMethods set non-null means xClose will be called.
    unsafe {
        (*ours).image = Arc::into_raw(image);
        (*ours).base.pMethods = &METHODS;
        if !out_flags.is_null() {
            *out_flags = ffi::SQLITE_OPEN_READONLY | ffi::SQLITE_OPEN_MAIN_DB;
        }
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes a valid filename.
    if unsafe { our_path(name) }.is_some() {
        // No journal, WAL or shm exists beside an image; the image itself is opened directly.
        // SAFETY: `out` is a valid pointer from SQLite.
        unsafe { *out = 0 };
        return ffi::SQLITE_OK;
    }
    let default = default_vfs();
    let _ = vfs;
    // SAFETY: delegating with the default VFS's own pointer and SQLite's arguments.
    unsafe { ((*default).xAccess.expect("default xAccess"))(default, name, flags, out) }
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: SQLite passes a valid filename.
    if let Some(path) = unsafe { our_path(name) } {
        let bytes = path.as_bytes();
        if bytes.len() + 1 > n_out as usize {
            return ffi::SQLITE_CANTOPEN;
        }
        // SAFETY: `out` has room for n_out bytes, checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out as *mut u8, bytes.len());
            *out.add(bytes.len()) = 0;
        }
        return ffi::SQLITE_OK;
    }
    let _ = vfs;
    let default = default_vfs();
    // SAFETY: delegating with the default VFS's own pointer and SQLite's arguments.
    unsafe { ((*default).xFullPathname.expect("default xFullPathname"))(default, name, n_out, out) }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_lock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// The image behind a file opened by `x_open`.
///
/// SAFETY: `file` must be a file `x_open` initialised and `x_close` has not released.
unsafe fn image<'a>(file: *mut ffi::sqlite3_file) -> &'a PageImage {
    // SAFETY: per the contract, `image` holds a live Arc's pointer.
    unsafe { &*(*(file as *mut ImageFile)).image }
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let ours = file as *mut ImageFile;
    // SAFETY: SQLite closes a file once; the pointer came from Arc::into_raw in x_open.
    unsafe {
        drop(Arc::from_raw((*ours).image));
        (*ours).image = std::ptr::null();
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file; SQLite hands a writable buffer of `amount` bytes.
    let (image, out) = unsafe {
        (
            image(file),
            std::slice::from_raw_parts_mut(buf as *mut u8, amount.max(0) as usize),
        )
    };
    // A panic must not unwind into C.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        image.read_or_record(offset.max(0) as u64, out)
    }));
    match read {
        Ok(Some(n)) if n == out.len() => ffi::SQLITE_OK,
        Ok(Some(_)) => ffi::SQLITE_IOERR_SHORT_READ,
        Ok(None) | Err(_) => ffi::SQLITE_IOERR_READ,
    }
}

unsafe extern "C" fn x_write(
    _file: *mut ffi::sqlite3_file,
    _buf: *const c_void,
    _amount: c_int,
    _offset: ffi::sqlite3_int64,
) -> c_int {
    ffi::SQLITE_READONLY
}

unsafe extern "C" fn x_truncate(_file: *mut ffi::sqlite3_file, _size: ffi::sqlite3_int64) -> c_int {
    ffi::SQLITE_READONLY
}

unsafe extern "C" fn x_sync(_file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file and a valid out pointer from SQLite.
    unsafe { *size = image(file).size() as ffi::sqlite3_int64 };
    ffi::SQLITE_OK
}

/// Locks are no-ops: the image never changes and nothing writes it.
unsafe extern "C" fn x_lock(_file: *mut ffi::sqlite3_file, _level: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_check_reserved_lock(
    _file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    // SAFETY: a valid out pointer from SQLite.
    unsafe { *out = 0 };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_control(
    _file: *mut ffi::sqlite3_file,
    _op: c_int,
    _arg: *mut c_void,
) -> c_int {
    ffi::SQLITE_NOTFOUND
}

unsafe extern "C" fn x_sector_size(_file: *mut ffi::sqlite3_file) -> c_int {
    4096
}

unsafe extern "C" fn x_device_characteristics(_file: *mut ffi::sqlite3_file) -> c_int {
    ffi::SQLITE_IOCAP_IMMUTABLE
}
