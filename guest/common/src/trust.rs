//! The device's trust store under `/state/trust` (kept by a factory reset): the keys it trusts
//! ([`nx_contract::state::TRUST_KEYS`], [`nx_contract::state::TRUST_DEV_KEYS`]) and its
//! anti-rollback floor ([`nx_contract::state::TRUST_FLOOR`]).
//!
//! [`load`] reads it into a [`proto::trust::TrustPolicy`] for the receiver (flashd) and the
//! boot check (init). It fails closed: a key file that does not parse, a symlink, too many
//! keys or a floor that is not a number make [`load`] fail, and the callers refuse every image
//! rather than fall back to "unprovisioned". [`raise_floor`] only ever raises the floor and
//! writes it atomically without following symlinks.

use nx_contract::state::{TRUST_DEV_KEYS, TRUST_FLOOR, TRUST_KEYS};
use proto::trust::{TrustPolicy, TrustedKey, MAX_KEYS, MAX_KEY_NAME};
use std::path::{Path, PathBuf};

/// Largest key file read.
const MAX_KEY_FILE: usize = 256;
/// Largest floor file read.
const MAX_FLOOR_FILE: usize = 64;

/// Why the trust store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Reading failed.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file has bad content.
    #[error("{path}: {reason}; fix or remove it (the device refuses every image until then)")]
    Bad { path: PathBuf, reason: String },
    /// Writing the floor failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read_dir_keys(
    dir: &Path,
    development: bool,
    out: &mut Vec<TrustedKey>,
) -> Result<(), TrustError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TrustError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| TrustError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let path = dir.join(&name);
        let Some(name) = name.to_str().map(str::to_string) else {
            return Err(TrustError::Bad {
                path,
                reason: "file name is not UTF-8".into(),
            });
        };
        if name.starts_with('.') {
            continue; // temp files of an atomic write
        }
        let Some(stem) = name.strip_suffix(".pub") else {
            return Err(TrustError::Bad {
                path,
                reason: "not a `<name>.pub` key file".into(),
            });
        };
        if stem.is_empty()
            || stem.len() > MAX_KEY_NAME
            || !stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(TrustError::Bad {
                path,
                reason: format!("key name must be [A-Za-z0-9._-]{{1,{MAX_KEY_NAME}}}"),
            });
        }
        names.push((stem.to_string(), path));
        if names.len() + out.len() > MAX_KEYS {
            return Err(TrustError::Bad {
                path: dir.to_path_buf(),
                reason: format!("more than {MAX_KEYS} keys"),
            });
        }
    }
    names.sort();
    for (name, path) in names {
        let bytes = crate::fsx::read_bounded_nofollow(&path, MAX_KEY_FILE)
            .map_err(|source| TrustError::Read {
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| TrustError::Bad {
                path: path.clone(),
                reason: "vanished while reading".into(),
            })?;
        let text = String::from_utf8(bytes).map_err(|_| TrustError::Bad {
            path: path.clone(),
            reason: "not text".into(),
        })?;
        let key = proto::image::decode_public_key(&text).map_err(|e| TrustError::Bad {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        out.push(TrustedKey {
            name,
            key,
            development,
        });
    }
    Ok(())
}

/// The floor in `state_root` (0 when never written).
pub fn floor(state_root: &Path) -> Result<u64, TrustError> {
    let path = state_root.join(TRUST_FLOOR);
    let Some(bytes) =
        crate::fsx::read_bounded_nofollow(&path, MAX_FLOOR_FILE).map_err(|source| {
            TrustError::Read {
                path: path.clone(),
                source,
            }
        })?
    else {
        return Ok(0);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .map(str::trim)
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or_else(|| TrustError::Bad {
            path,
            reason: "not a decimal security version".into(),
        })
}

/// The trust policy stored under `state_root` (e.g. `/state`).
pub fn load(state_root: &Path) -> Result<TrustPolicy, TrustError> {
    let mut keys = Vec::new();
    read_dir_keys(&state_root.join(TRUST_KEYS), false, &mut keys)?;
    read_dir_keys(&state_root.join(TRUST_DEV_KEYS), true, &mut keys)?;
    Ok(TrustPolicy {
        keys,
        floor: floor(state_root)?,
        broken: None,
    })
}

/// Raise the floor to `security_version` if it is higher; returns the floor now in force.
/// Never lowers it. Written atomically (temp file, fsync, rename, directory fsync).
pub fn raise_floor(state_root: &Path, security_version: u64) -> Result<u64, TrustError> {
    let current = floor(state_root)?;
    if security_version <= current {
        return Ok(current);
    }
    let path = state_root.join(TRUST_FLOOR);
    let (dir, name) = crate::fsx::split_path(&path).map_err(|source| TrustError::Write {
        path: path.clone(),
        source,
    })?;
    std::fs::create_dir_all(dir).map_err(|source| TrustError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    crate::fsx::write_atomic(dir, name, format!("{security_version}\n").as_bytes()).map_err(
        |source| TrustError::Write {
            path: path.clone(),
            source,
        },
    )?;
    Ok(security_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::image::{encode_public_key, public_key_of};

    fn put_key(root: &Path, dir: &str, name: &str, seed: u8) -> [u8; 32] {
        let k = public_key_of(&[seed; 32]);
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join(name), encode_public_key(&k)).unwrap();
        k
    }

    #[test]
    fn empty_store_is_unprovisioned_with_floor_zero() {
        let d = tempfile::tempdir().unwrap();
        let p = load(d.path()).unwrap();
        assert!(!p.is_provisioned());
        assert_eq!(p.floor, 0);
    }

    #[test]
    fn keys_of_both_kinds_and_the_floor_load() {
        let d = tempfile::tempdir().unwrap();
        let r = put_key(d.path(), TRUST_KEYS, "release-2026.pub", 1);
        let n = put_key(d.path(), TRUST_KEYS, "release-2027.pub", 2);
        let dev = put_key(d.path(), TRUST_DEV_KEYS, "nexus-dev.pub", 3);
        std::fs::write(d.path().join(TRUST_FLOOR), "4\n").unwrap();
        let p = load(d.path()).unwrap();
        let got: Vec<_> = p
            .keys
            .iter()
            .map(|k| (k.name.as_str(), k.key, k.development))
            .collect();
        assert_eq!(
            got,
            vec![
                ("release-2026", r, false),
                ("release-2027", n, false),
                ("nexus-dev", dev, true)
            ]
        );
        assert_eq!(p.floor, 4);
    }

    #[test]
    fn bad_content_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(TRUST_KEYS)).unwrap();
        std::fs::write(d.path().join(TRUST_KEYS).join("x.pub"), "garbage").unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.to_string().contains("refuses every image"), "{e}");

        let d = tempfile::tempdir().unwrap();
        put_key(d.path(), TRUST_KEYS, "ok.pub", 1);
        std::os::unix::fs::symlink(
            d.path().join(TRUST_KEYS).join("ok.pub"),
            d.path().join(TRUST_KEYS).join("link.pub"),
        )
        .unwrap();
        assert!(load(d.path()).is_err(), "a symlinked key is refused");

        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("trust")).unwrap();
        std::fs::write(d.path().join(TRUST_FLOOR), "two").unwrap();
        assert!(load(d.path()).is_err());
    }

    #[test]
    fn the_floor_only_rises_and_never_follows_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(raise_floor(d.path(), 3).unwrap(), 3);
        assert_eq!(raise_floor(d.path(), 2).unwrap(), 3);
        assert_eq!(floor(d.path()).unwrap(), 3);
        // A symlink planted at the temp path is replaced, its target untouched.
        let victim = d.path().join("trust/keys-victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("trust/.security_version.tmp")).unwrap();
        assert_eq!(raise_floor(d.path(), 9).unwrap(), 9);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(floor(d.path()).unwrap(), 9);
    }
}
