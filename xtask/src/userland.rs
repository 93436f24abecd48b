//! The small real userland of the rootfs: Debian's `busybox-static` (one static binary, the
//! shell and the usual tools as applets), fetched with `apt-get download` and unpacked under
//! `build/userland/` like the kernel (nothing installed system-wide). Cached: the package
//! name+version is recorded and the download happens once (`--fresh` fetches again).

use crate::util;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The Debian package.
pub const PACKAGE: &str = "busybox-static";

/// `build/userland/busybox` (fetched when missing or `fresh`).
pub fn busybox(build: &Path, fresh: bool) -> anyhow::Result<PathBuf> {
    let dir = build.join("userland");
    let out = dir.join("busybox");
    if out.is_file() && !fresh {
        return Ok(out);
    }
    let root = dir.join("root");
    let deb = util::download_deb(PACKAGE, &dir.join("dl"), &root)?;
    let bin = root.join("bin/busybox");
    let bytes = std::fs::read(&bin).with_context(|| {
        format!(
            "{} has no bin/busybox (unpacked into {})",
            deb.display(),
            root.display()
        )
    })?;
    if crate::guest::has_interpreter(&bytes) {
        anyhow::bail!(
            "{} is dynamically linked; expected the static build",
            bin.display()
        );
    }
    util::write_if_changed(&out, &bytes)?;
    std::fs::remove_dir_all(dir.join("dl")).ok();
    std::fs::remove_dir_all(&root).ok();
    eprintln!("xtask: userland: {} from {}", out.display(), deb.display());
    Ok(out)
}
