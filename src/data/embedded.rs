//! The default dataset that ships inside the binary: `data/cifar10-mini.zip` (4,000 train and
//! 1,000 test CIFAR-10 images, 10 classes; provenance in `data/README.md`).
//!
//! Why it exists: `sdengine train --method suave` with no data flag must run from a fresh clone,
//! with nothing to download. The pack is compiled in with `include_bytes!` (5 MB) and extracted
//! once into a cache folder as an ImageFolder layout (`train/<class>/*.jpg`, `test/<class>/*.jpg`)
//! that [`crate::data::Dataset::image_folder`] reads like any user dataset, so the rest of the
//! pipeline has no special case for it.
//!
//! Extraction is safe to run from several processes at once (e.g. one per rank): each extracts to
//! its own temporary sibling folder, writes a marker file last, and renames the folder into place;
//! a process that loses the rename race uses the winner's folder. The folder name carries a hash
//! of the pack, so a binary with a different pack never reads an old extraction.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The bytes of `data/cifar10-mini.zip`: stored (uncompressed) JPEG entries
/// `train/<class>/NNNN.jpg` (400 a class) and `test/<class>/NNNN.jpg` (100 a class).
pub static CIFAR10_MINI_ZIP: &[u8] = include_bytes!("../../data/cifar10-mini.zip");

/// Name stem of the extracted folder (`<stem>-<hash>`), also used in error messages.
const CIFAR10_MINI_STEM: &str = "cifar10-mini";

/// The file written last into an extracted folder; its presence with the expected content is what
/// makes a folder valid (a crash mid-extraction leaves a folder without it, which is redone).
pub const MARKER_FILE: &str = ".sdengine-extracted";

/// The folder holding the embedded CIFAR-10 subset (`train/` and `test/`, ImageFolder layout),
/// extracting the pack into [`cache_root`] on first use.
///
/// Later calls (and other processes) find the folder by its marker and return at once.
pub fn cifar10_mini_dir() -> Result<PathBuf> {
    extract_zip(CIFAR10_MINI_ZIP, &cache_root(), CIFAR10_MINI_STEM)
}

/// Where extracted packs live: `$SDENGINE_CACHE`, else `$XDG_CACHE_HOME/sdengine`, else
/// `$HOME/.cache/sdengine`, else `<system temp>/sdengine`. Empty variables count as unset, and a
/// relative `XDG_CACHE_HOME` is ignored, as the XDG base-directory specification says.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("SDENGINE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if p.is_absolute() {
            return p.join("sdengine");
        }
    }
    if let Some(h) = var("HOME") {
        return PathBuf::from(h).join(".cache").join("sdengine");
    }
    std::env::temp_dir().join("sdengine")
}

/// 64-bit FNV-1a of `bytes`: a content hash for naming extraction folders (not a security
/// measure; the pack is part of the binary). No hashing crate is needed for this.
pub fn pack_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hash of the embedded pack, computed once per process (5 MB, a few milliseconds).
fn embedded_hash(pack: &[u8]) -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    if std::ptr::eq(pack, CIFAR10_MINI_ZIP) {
        *HASH.get_or_init(|| pack_hash(CIFAR10_MINI_ZIP))
    } else {
        pack_hash(pack)
    }
}

fn io_err(path: &Path, err: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        err,
    }
}

fn format_err(what: &str, detail: impl Into<String>) -> Error {
    Error::Format {
        path: what.to_string(),
        detail: detail.into(),
    }
}

/// The content expected in [`MARKER_FILE`] for a pack.
fn marker_text(stem: &str, hash: u64, entries: usize) -> String {
    format!("{stem} {hash:016x} {entries}\n")
}

/// Whether `dir` is a complete extraction of the pack with this hash (the marker names the hash;
/// the entry count is checked when the marker is written).
fn is_complete(dir: &Path, stem: &str, hash: u64) -> bool {
    match std::fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(s) => s.starts_with(&format!("{stem} {hash:016x} ")),
        Err(_) => false,
    }
}

/// Splits a zip entry name into checked path components: relative, `/`-separated, with no empty,
/// `.` or `..` component, no backslash, drive colon or NUL. Anything else is refused, so that no
/// entry can write outside the extraction folder.
pub fn checked_entry_path(name: &str) -> Option<PathBuf> {
    let trimmed = name.strip_suffix('/').unwrap_or(name);
    if trimmed.is_empty() || trimmed.starts_with('/') {
        return None;
    }
    let mut out = PathBuf::new();
    for part in trimmed.split('/') {
        if part.is_empty()
            || part == "."
            || part == ".."
            || part.contains(['\\', ':', '\0'])
            || part == MARKER_FILE
        {
            return None;
        }
        out.push(part);
    }
    Some(out)
}

/// A name for a temporary sibling that no other thread or process uses.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Writes every entry of the zip `pack` under `dir` (which exists and is empty), then the marker.
/// Returns the number of file entries.
fn extract_into(pack: &[u8], dir: &Path, stem: &str, hash: u64) -> Result<usize> {
    let what = format!("{stem}.zip (embedded pack)");
    let mut zip = zip::ZipArchive::new(Cursor::new(pack))
        .map_err(|e| format_err(&what, format!("not a readable zip archive: {e}")))?;
    let mut files = 0usize;
    let mut made: Option<PathBuf> = None;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| format_err(&what, format!("entry {i}: {e}")))?;
        let name = entry.name().to_string();
        let rel = checked_entry_path(&name).ok_or_else(|| {
            format_err(
                &what,
                format!("entry {i} has an unsafe name {name:?} (absolute, `..`, or empty part)"),
            )
        })?;
        let path = dir.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(|e| io_err(&path, e))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            // Entries come grouped by folder: create each folder once, not once per file.
            if made.as_deref() != Some(parent) {
                std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
                made = Some(parent.to_path_buf());
            }
        }
        // create_new: a duplicate entry name is an error, not a silent overwrite.
        let mut out = std::fs::File::create_new(&path).map_err(|e| io_err(&path, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| {
            format_err(
                &what,
                format!("entry {name:?}: {e} (while writing {})", path.display()),
            )
        })?;
        files += 1;
    }
    let marker = dir.join(MARKER_FILE);
    std::fs::write(&marker, marker_text(stem, hash, files)).map_err(|e| io_err(&marker, e))?;
    Ok(files)
}

/// Extracts the zip `pack` into `<cache>/<stem>-<hash>` unless a complete extraction is already
/// there, and returns that folder.
///
/// Public so that tests (and future packs) can use an explicit cache folder and their own archive
/// rather than the process-wide environment. The archive is written to a temporary sibling and
/// renamed into place; if another process renamed first, its folder is used and ours removed. An
/// incomplete folder at the final name (no marker, e.g. an interrupted manual copy) is replaced.
pub fn extract_zip(pack: &[u8], cache: &Path, stem: &str) -> Result<PathBuf> {
    let hash = embedded_hash(pack);
    let target = cache.join(format!("{stem}-{hash:016x}"));
    if is_complete(&target, stem, hash) {
        return Ok(target);
    }
    std::fs::create_dir_all(cache).map_err(|e| {
        io_err(
            cache,
            std::io::Error::new(
                e.kind(),
                format!(
                    "{e} (cannot create the cache folder; set SDENGINE_CACHE to a writable folder)"
                ),
            ),
        )
    })?;
    let tmp = cache.join(format!(".{stem}-{hash:016x}.tmp-{}", unique_suffix()));
    std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result =
        extract_into(pack, &tmp, stem, hash).and_then(|_| place(&tmp, &target, stem, hash));
    if tmp.exists() {
        // Either extraction failed or another process won the rename: ours is surplus.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| target)
}

/// Renames the complete folder `tmp` to `target`, coping with a concurrent winner or a stale,
/// incomplete folder at `target`.
fn place(tmp: &Path, target: &Path, stem: &str, hash: u64) -> Result<()> {
    for _ in 0..3 {
        match std::fs::rename(tmp, target) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if is_complete(target, stem, hash) {
                    return Ok(()); // another caller won the race; use its folder
                }
                if !target.exists() {
                    return Err(io_err(target, e));
                }
                // An incomplete folder occupies the name: move it aside (atomic, so two callers
                // cannot both delete a fresh winner), then delete it and retry.
                let stale =
                    target.with_file_name(format!(".{stem}-{hash:016x}.stale-{}", unique_suffix()));
                if std::fs::rename(target, &stale).is_ok() {
                    if is_complete(&stale, stem, hash) {
                        // A winner completed between our checks: put it back if we can.
                        if std::fs::rename(&stale, target).is_ok() {
                            return Ok(());
                        }
                    }
                    let _ = std::fs::remove_dir_all(&stale);
                }
            }
        }
    }
    if is_complete(target, stem, hash) {
        return Ok(());
    }
    Err(io_err(
        target,
        std::io::Error::other(
            "cannot replace an incomplete extraction folder; delete it and retry",
        ),
    ))
}
