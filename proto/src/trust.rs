//! What a target trusts — its public keys and its anti-rollback floor — and the decision for
//! one image head. Sans-IO: the target's shell loads the policy from its state (`/state/trust`
//! in the guest) and hands it to the receiver; the receiver asks [`TrustPolicy::check`] at
//! every HELLO, before anything is written.
//!
//! Rules:
//! - **Unprovisioned** (no key): every image is accepted, signed or not; the target says so
//!   (`REPLY_UNPROVISIONED`, a `stub/placeholder` console marker) so nobody mistakes it for a
//!   protected device.
//! - **Provisioned:** the manifest signature must verify with one of the keys (two keys at
//!   once is how a key is rotated: add the new one, ship images signed with it, remove the
//!   old one).
//! - **Anti-rollback** (AVB rollback indexes): an image whose `security_version` is below the
//!   floor is refused. `--allow-downgrade` lifts that only for an image signed with a key
//!   marked *development* (or on an unprovisioned target); a release key never downgrades.
//!   The floor is raised by the device when a slot is confirmed, never here.

use crate::image::ImageHead;

/// Longest key name (the file stem under `/state/trust/keys`).
pub const MAX_KEY_NAME: usize = 64;
/// Most keys a target trusts at once.
pub const MAX_KEYS: usize = 16;

/// One trusted Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Its name (for messages).
    pub name: String,
    /// The public key.
    pub key: [u8; 32],
    /// A development key: images it signs may be installed below the floor with
    /// `--allow-downgrade`.
    pub development: bool,
}

/// The keys and the floor of a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Trusted keys; empty = unprovisioned.
    pub keys: Vec<TrustedKey>,
    /// Lowest security version accepted.
    pub floor: u64,
    /// The trust store could not be read (why): every image is refused (fail closed).
    pub broken: Option<String>,
}

/// Why an image is refused (the text goes to the host in ERROR and to the console).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature on a provisioned target.
    #[error(
        "image is not signed and this device trusts only signed images (keys: {keys}); \
         sign it with `nx image build --sign KEY`"
    )]
    Unsigned {
        /// The trusted key names.
        keys: String,
    },
    /// Signed, but by none of the trusted keys (or the manifest was altered).
    #[error(
        "image signature does not verify with any key this device trusts (keys: {keys}): \
         signed with another key, or altered after signing"
    )]
    Untrusted {
        /// The trusted key names.
        keys: String,
    },
    /// The trust store is unreadable.
    #[error(
        "this device's trust store is unusable ({0}); every image is refused until it is repaired"
    )]
    Store(String),
    /// Below the floor.
    #[error(
        "image security version {security_version} is below this device's anti-rollback floor \
         {floor}: older images are refused{hint}"
    )]
    Rollback {
        /// The image's security version.
        security_version: u64,
        /// The device's floor.
        floor: u64,
        /// Advice.
        hint: &'static str,
    },
}

impl Refusal {
    /// Whether this is an anti-rollback refusal (else a signature one).
    pub fn is_rollback(&self) -> bool {
        matches!(self, Refusal::Rollback { .. })
    }
}

/// Why an image is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The key that verified the signature; `None` on an unprovisioned target.
    pub key: Option<String>,
    /// Installed below the floor (`--allow-downgrade` with a development key).
    pub downgrade: bool,
}

impl TrustPolicy {
    /// Whether at least one key is provisioned (a broken store counts as provisioned: it
    /// accepts nothing).
    pub fn is_provisioned(&self) -> bool {
        !self.keys.is_empty() || self.broken.is_some()
    }

    /// A policy that refuses everything because the store could not be read.
    pub fn unusable(why: impl Into<String>) -> TrustPolicy {
        TrustPolicy {
            keys: Vec::new(),
            floor: u64::MAX,
            broken: Some(why.into()),
        }
    }

    fn names(&self) -> String {
        self.keys
            .iter()
            .map(|k| {
                if k.development {
                    format!("{} (development)", k.name)
                } else {
                    k.name.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Decide for `head` (already parsed and validated).
    pub fn check(&self, head: &ImageHead, allow_downgrade: bool) -> Result<Accepted, Refusal> {
        if let Some(why) = &self.broken {
            return Err(Refusal::Store(why.clone()));
        }
        let key = if self.is_provisioned() {
            if !head.is_signed() {
                return Err(Refusal::Unsigned { keys: self.names() });
            }
            match self
                .keys
                .iter()
                .find(|k| head.verify_signature(&k.key).is_ok())
            {
                Some(k) => Some(k),
                None => return Err(Refusal::Untrusted { keys: self.names() }),
            }
        } else {
            None
        };
        let sv = head.manifest.security_version;
        if sv >= self.floor {
            return Ok(Accepted {
                key: key.map(|k| k.name.clone()),
                downgrade: false,
            });
        }
        let dev = key.is_none_or(|k| k.development);
        if allow_downgrade && dev {
            return Ok(Accepted {
                key: key.map(|k| k.name.clone()),
                downgrade: true,
            });
        }
        Err(Refusal::Rollback {
            security_version: sv,
            floor: self.floor,
            hint: if allow_downgrade {
                " (--allow-downgrade applies only to images signed with a development key)"
            } else {
                ""
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{layout_with, public_key_of, sign_manifest, LayoutOptions};
    use crate::manifest::SegmentHasher;

    fn head(sv: u64, seed: Option<[u8; 32]>) -> ImageHead {
        let mut h = SegmentHasher::new();
        h.update(b"rootfs bytes");
        let m = layout_with(
            &LayoutOptions {
                version: "1".into(),
                security_version: sv,
                verity: vec![],
            },
            &[("rootfs".into(), h.finish())],
        )
        .unwrap();
        let sig = seed.map(|s| sign_manifest(&s, &m.to_canonical_bytes()));
        ImageHead::build(&m, sig).unwrap()
    }

    fn key(name: &str, seed: [u8; 32], development: bool) -> TrustedKey {
        TrustedKey {
            name: name.into(),
            key: public_key_of(&seed),
            development,
        }
    }

    const REL: [u8; 32] = [1; 32];
    const DEV: [u8; 32] = [2; 32];
    const NEW: [u8; 32] = [3; 32];
    const OTHER: [u8; 32] = [4; 32];

    #[test]
    fn unprovisioned_accepts_anything_and_says_so() {
        let p = TrustPolicy::default();
        assert!(!p.is_provisioned());
        assert_eq!(p.check(&head(0, None), false).unwrap().key, None);
        assert_eq!(p.check(&head(0, Some(OTHER)), false).unwrap().key, None);
    }

    #[test]
    fn provisioned_needs_a_trusted_signature() {
        let p = TrustPolicy {
            keys: vec![key("release", REL, false)],
            floor: 0,
            broken: None,
        };
        assert!(matches!(
            p.check(&head(1, None), false),
            Err(Refusal::Unsigned { .. })
        ));
        let e = p.check(&head(1, Some(OTHER)), false).unwrap_err();
        assert!(matches!(e, Refusal::Untrusted { .. }));
        assert!(e.to_string().contains("keys: release"), "{e}");
        assert_eq!(
            p.check(&head(1, Some(REL)), false).unwrap().key.as_deref(),
            Some("release")
        );
    }

    #[test]
    fn two_keys_rotate() {
        let p = TrustPolicy {
            keys: vec![key("old", REL, false), key("new", NEW, false)],
            floor: 0,
            broken: None,
        };
        assert_eq!(
            p.check(&head(1, Some(REL)), false).unwrap().key.unwrap(),
            "old"
        );
        assert_eq!(
            p.check(&head(1, Some(NEW)), false).unwrap().key.unwrap(),
            "new"
        );
    }

    #[test]
    fn floor_refuses_older_images_and_only_dev_keys_downgrade() {
        let p = TrustPolicy {
            keys: vec![key("release", REL, false), key("dev", DEV, true)],
            floor: 5,
            broken: None,
        };
        assert!(p.check(&head(5, Some(REL)), false).is_ok());
        assert!(p.check(&head(6, Some(REL)), false).is_ok());
        let e = p.check(&head(4, Some(REL)), false).unwrap_err();
        assert!(e.is_rollback());
        assert!(e.to_string().contains("security version 4 is below"), "{e}");
        let e = p.check(&head(4, Some(REL)), true).unwrap_err();
        assert!(
            e.to_string()
                .contains("only to images signed with a development key"),
            "{e}"
        );
        assert!(p
            .check(&head(4, Some(DEV)), false)
            .unwrap_err()
            .is_rollback());
        let a = p.check(&head(4, Some(DEV)), true).unwrap();
        assert!(a.downgrade);
        // Unprovisioned: the floor still holds unless downgrading is asked for.
        let u = TrustPolicy {
            keys: vec![],
            floor: 5,
            broken: None,
        };
        assert!(u.check(&head(4, None), false).unwrap_err().is_rollback());
        assert!(u.check(&head(4, None), true).unwrap().downgrade);
    }
}
