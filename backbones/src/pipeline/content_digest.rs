//! The SHA-256 of a weight file's bytes, remembered beside it.
//!
//! An encoding cache must notice an encoder with other weights even when its shapes (and so
//! its safetensors header) are the same, so the fingerprint hashes the content. Hashing a 10 GB
//! encoder takes seconds, not nothing, so the digest is written next to the file
//! (`.<name>.softalign-sha256.json`) with the file's size and modification time, and reused
//! while both still match. Where the folder is read-only the digest is simply recomputed.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use softalign_core::tensors::write_atomic;
use softalign_core::{Error, Result};

/// What the memo file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub bytes: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: u128,
    pub sha256: String,
}

/// Where the digest of `file` is remembered.
pub fn memo_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.with_file_name(format!(".{name}.softalign-sha256.json"))
}

/// Size and modification time of `file` (following links, as hub caches link to blobs).
fn stamp(file: &Path) -> Result<(u64, u128)> {
    let meta = std::fs::metadata(file).map_err(|e| Error::file(file, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), mtime))
}

fn hash_file(file: &Path) -> Result<String> {
    let mut f = std::fs::File::open(file).map_err(|e| Error::file(file, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::file(file, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The SHA-256 of `file`'s bytes: the remembered one while the file's size and modification
/// time are unchanged, else computed (and remembered where the folder is writable).
pub fn content_sha256(file: &Path) -> Result<String> {
    let (bytes, mtime_ns) = stamp(file)?;
    let memo = memo_path(file);
    let known = std::fs::read_to_string(&memo)
        .ok()
        .and_then(|t| serde_json::from_str::<Remembered>(&t).ok())
        .filter(|r| r.bytes == bytes && r.mtime_ns == mtime_ns);
    if let Some(r) = known {
        return Ok(r.sha256);
    }
    let sha256 = hash_file(file)?;
    // The file may have changed while it was read: remember only a stable stamp.
    if stamp(file)? == (bytes, mtime_ns) {
        let r = Remembered {
            bytes,
            mtime_ns,
            sha256: sha256.clone(),
        };
        let text = serde_json::to_string(&r).expect("plain data serialises");
        // A read-only model folder (a shared hub cache) only costs the re-hash next time.
        let _ = write_atomic(&memo, text.as_bytes());
    }
    Ok(sha256)
}
