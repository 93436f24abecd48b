//! The persistent disks: `build/state.img` (ext4 labelled `state` with the /state layout) and
//! `build/disk.img` (GPT with `system_a`, `system_b`). Created once and kept across runs —
//! persistence across boots is the point — and recreated by `cargo xtask guest --fresh`.

use crate::util::{run_cmd, tool};
use anyhow::Context;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Top-level directories of /state (ARCHITECTURE.md).
pub const STATE_DIRS: [&str; 8] = [
    "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
];
/// Size of state.img (sparse).
pub const STATE_MIB: u64 = 1024;
/// Size of each slot partition.
pub const SLOT_MIB: u64 = 512;

/// Create `state.img` unless it exists (or `fresh`).
pub fn ensure_state(path: &Path, fresh: bool) -> anyhow::Result<()> {
    if path.exists() && !fresh {
        eprintln!(
            "xtask: {} kept (persistent; --fresh recreates it)",
            path.display()
        );
        return Ok(());
    }
    let mkfs = tool("mkfs.ext4")?;
    let tree = tempfile::tempdir().context("temporary directory for the /state tree")?;
    for d in STATE_DIRS {
        std::fs::create_dir_all(tree.path().join(d))?;
    }
    let tmp = path.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.set_len(STATE_MIB << 20)?;
    }
    run_cmd(
        Command::new(mkfs)
            .args(["-q", "-F", "-L", "state", "-E", "root_owner=0:0", "-d"])
            .arg(tree.path())
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, path)?;
    eprintln!(
        "xtask: created {} (ext4, label state, {STATE_MIB} MiB sparse)",
        path.display()
    );
    Ok(())
}

/// Create `disk.img` unless it exists (or `fresh`).
pub fn ensure_disk(path: &Path, fresh: bool) -> anyhow::Result<()> {
    if path.exists() && !fresh {
        eprintln!(
            "xtask: {} kept (persistent; --fresh recreates it)",
            path.display()
        );
        return Ok(());
    }
    let sfdisk = tool("sfdisk")?;
    let tmp = path.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        // 1 MiB head, two slots, 1 MiB for the backup GPT.
        f.set_len((2 * SLOT_MIB + 2) << 20)?;
    }
    // Fixed GUIDs: same inputs, same disk.
    let script = format!(
        "label: gpt\nlabel-id: 6E657875-732D-4469-736B-000000000001\n\
         start=2048, size={s}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6E657875-732D-536C-6F74-00000000000A, name=system_a\n\
         size={s}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6E657875-732D-536C-6F74-00000000000B, name=system_b\n",
        s = SLOT_MIB
    );
    eprintln!(
        "$ sfdisk {} <<< (GPT: system_a, system_b, {SLOT_MIB} MiB each)",
        tmp.display()
    );
    let mut child = Command::new(sfdisk)
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .spawn()
        .context("could not start sfdisk")?;
    child
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(script.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(
        status.success(),
        "sfdisk failed ({status}) on {}",
        tmp.display()
    );
    std::fs::rename(&tmp, path)?;
    eprintln!(
        "xtask: created {} (GPT: system_a, system_b)",
        path.display()
    );
    Ok(())
}
