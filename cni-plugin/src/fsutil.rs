//! Small crash-safe file helpers shared by the node state file and the IPAM store.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Durability of an atomic write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// The data is on disk before the rename: a power loss leaves the old or the new content.
    Data,
    /// Only atomic against process crashes (the page cache is shared): for files that belong
    /// to one boot and are discarded after a reboot anyway.
    None,
}

/// Writes `data` to `path` atomically: a temp file in the same directory is written (and synced,
/// per `sync`) and renamed over `path`, so readers see the old or the new content, never a torn
/// file.
pub fn write_atomic(path: &Path, data: &[u8], sync: Sync) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        if sync == Sync::Data {
            f.sync_data()?;
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    // The directory is not synced: the data is durable before the rename (so no power loss can
    // leave an empty file), and losing the rename itself only brings back the previous,
    // consistent content. mistnet's stores are reboot-volatile by design (DESIGN.md §2).
    result
}
