//! The signing keys of the build: the **development key** every image of this checkout is
//! signed with (and every factory `/state` trusts, under `trust/dev-keys/`), and an
//! **untrusted key** the trust tests sign with to be refused.
//!
//! Both are derived from fixed strings, so images stay byte-identical on every machine. They
//! are public by construction — a development key is never a secret (like AOSP's test-keys):
//! it marks a device as a development device, where `nx flash send --allow-downgrade` is
//! honoured. A product signs with its own release key (`nx image keygen`, kept offline) and
//! provisions only that key's `.pub`; see docs/tools/trust.md.

use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Name of the development key (its file stem under `trust/dev-keys/`).
pub const DEV_KEY_NAME: &str = "nexus-dev";
/// What the development key is derived from.
const DEV_KEY_LABEL: &str = "nexus development signing key v1 (public, NOT a secret)";
/// What the untrusted test key is derived from.
const UNTRUSTED_KEY_LABEL: &str = "nexus untrusted test key v1 (never provisioned)";

fn seed(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

/// The development key's secret seed.
pub fn dev_seed() -> [u8; 32] {
    seed(DEV_KEY_LABEL)
}

/// The untrusted test key's secret seed.
pub fn untrusted_seed() -> [u8; 32] {
    seed(UNTRUSTED_KEY_LABEL)
}

/// The development public key file text (`nexus-ed25519-public-v1 …`).
pub fn dev_public_text() -> String {
    proto::image::encode_public_key(&proto::image::public_key_of(&dev_seed()))
}

/// Where the development secret key file lives (written by [`ensure_dev_key`]).
pub fn dev_key_path(build: &Path) -> PathBuf {
    build.join("keys").join(format!("{DEV_KEY_NAME}.key"))
}

/// Write `build/keys/nexus-dev.key` and `.pub` (unchanged files are left alone).
pub fn ensure_dev_key(build: &Path) -> anyhow::Result<PathBuf> {
    let key = dev_key_path(build);
    let dir = key.parent().context("key directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    crate::util::write_if_changed(
        &key,
        proto::image::encode_secret_key(&dev_seed()).as_bytes(),
    )?;
    crate::util::write_if_changed(&key.with_extension("pub"), dev_public_text().as_bytes())?;
    Ok(key)
}

/// Put the factory trust store into a `/state` tree: the development key.
pub fn provision(state_tree: &Path) -> anyhow::Result<()> {
    let dir = state_tree.join(nx_contract::state::TRUST_DEV_KEYS);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let file = dir.join(format!("{DEV_KEY_NAME}.pub"));
    std::fs::write(&file, dev_public_text()).with_context(|| format!("write {}", file.display()))
}

/// Copy `image` to `out` with its signature replaced: by `seed`'s, or removed (`None`).
/// The manifest and every segment stay as they are.
pub fn resign(image: &Path, out: &Path, seed: Option<&[u8; 32]>) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(image).with_context(|| format!("read {}", image.display()))?;
    let header = proto::image::Header::parse(&bytes)
        .with_context(|| format!("{}: not an image", image.display()))?;
    let head_len = usize::try_from(header.data_offset).context("head length")?;
    let head = proto::image::ImageHead::parse(bytes.get(..head_len).context("short image")?)
        .with_context(|| format!("{}: not an image", image.display()))?;
    let sig = seed.map(|s| proto::image::sign_manifest(s, &head.manifest_bytes));
    let new = proto::image::ImageHead::build(&head.manifest, sig)
        .context("rebuild the image head")?
        .to_bytes();
    bytes
        .get_mut(..new.len())
        .context("image shorter than its head")?
        .copy_from_slice(&new);
    std::fs::write(out, bytes).with_context(|| format!("write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_and_distinct() {
        assert_eq!(dev_seed(), dev_seed());
        assert_ne!(dev_seed(), untrusted_seed());
        let k = proto::image::decode_public_key(&dev_public_text()).unwrap();
        assert_eq!(k, proto::image::public_key_of(&dev_seed()));
    }
}
