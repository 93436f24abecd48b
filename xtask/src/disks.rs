//! The persistent disks: `build/state.img` (ext4 labelled `state` with the /state layout) and
//! `build/disk.img` (GPT with `system_a`, `system_b` and the EFI system partition `esp`, which
//! holds systemd-boot, the boot entries, the kernel and the initramfs images: `esp.rs`). Created once and kept across runs —
//! persistence across boots is the point — and recreated by `cargo xtask guest --fresh`.
//!
//! The slot disk is seeded like a factory-fresh device: the demo image (version 1) is written
//! at the start of `system_a`, so slot a boots and matches bootctld's factory default
//! (a active and good, b empty). A kept disk whose `system_a` was never written (its first
//! 4 KiB are zero) is seeded too; one that holds anything else is left alone.

use crate::esp::ESP_MIB;
use crate::util::{run_cmd, tool};
use anyhow::Context;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Top-level directories of /state (ARCHITECTURE.md): the contract's layout.
pub use nx_contract::state::STATE_DIRS;
/// Size of state.img (sparse).
pub const STATE_MIB: u64 = 1024;
/// Size of each slot partition.
pub const SLOT_MIB: u64 = 512;
/// First sector of `system_a` (1 MiB: the GPT head before it).
pub const SYSTEM_A_START_SECTOR: u64 = 2048;

/// Byte offset of the ESP in disk.img (after both slots, so the slots keep their offsets).
pub fn esp_offset() -> u64 {
    slot_offset('b') + (SLOT_MIB << 20)
}

/// Byte offset of a slot partition in disk.img (`a` or `b`), from the fixed layout.
pub fn slot_offset(slot: char) -> u64 {
    let a = SYSTEM_A_START_SECTOR * 512;
    if slot == 'b' {
        a + (SLOT_MIB << 20)
    } else {
        a
    }
}

/// Create `state.img` unless it exists (or `fresh`).
pub fn ensure_state(path: &Path, fresh: bool) -> anyhow::Result<()> {
    if path.exists() && !fresh {
        eprintln!(
            "xtask: {} kept (persistent; --fresh recreates it)",
            path.display()
        );
        if !trusts_a_key(path) {
            eprintln!(
                "xtask: warning: {} trusts no key (it predates the factory trust store): its \
                 flashd accepts unsigned images and prints the stub/placeholder marker the tests \
                 forbid; recreate it with `cargo xtask guest --fresh`",
                path.display()
            );
        }
        return Ok(());
    }
    let tree = tempfile::tempdir().context("temporary directory for the /state tree")?;
    for d in STATE_DIRS {
        std::fs::create_dir_all(tree.path().join(d))?;
    }
    crate::keys::provision(tree.path())?;
    mkfs_state(path, tree.path())?;
    eprintln!(
        "xtask: created {} (ext4, label state, {STATE_MIB} MiB sparse; trusts the development key {})",
        path.display(),
        crate::keys::DEV_KEY_NAME
    );
    Ok(())
}

/// Whether the state image at `path` holds a key under `trust/keys` or `trust/dev-keys`
/// (read offline with debugfs; `false` when it cannot be read).
fn trusts_a_key(path: &Path) -> bool {
    let Ok(debugfs) = tool("debugfs") else {
        return false;
    };
    [
        nx_contract::state::TRUST_KEYS,
        nx_contract::state::TRUST_DEV_KEYS,
    ]
    .iter()
    .any(|dir| {
        Command::new(&debugfs)
            .arg("-R")
            .arg(format!("ls -p /{dir}"))
            .arg(path)
            .stderr(std::process::Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(".pub/"))
    })
}

/// (Re)create `state.img` at `path` holding exactly the tree `tree` (ext4, label `state`,
/// root-owned, [`STATE_MIB`] MiB sparse), atomically (a `.img.tmp` renamed over `path`).
pub fn mkfs_state(path: &Path, tree: &Path) -> anyhow::Result<()> {
    let mkfs = tool("mkfs.ext4")?;
    let tmp = path.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.set_len(STATE_MIB << 20)?;
    }
    run_cmd(
        Command::new(mkfs)
            .args(["-q", "-F", "-L", "state", "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Write `image` at the start of `system_a` of `disk` when that slot was never written.
/// Returns whether it seeded.
pub fn seed_slot_a(disk: &Path, image: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("open {}", disk.display()))?;
    let off = slot_offset('a');
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, off)
        .with_context(|| format!("read system_a of {}", disk.display()))?;
    let bytes = std::fs::read(image).with_context(|| format!("read {}", image.display()))?;
    if first.iter().any(|&b| b != 0) {
        // An image of another format (magic `NXOSIMG\0`, format u32 LE at 8) no longer boots
        // with this build: say how to start over instead of failing later in the guest.
        let format = |b: &[u8]| b.get(8..12).map(|f| f.to_vec());
        if first.starts_with(b"NXOSIMG\0")
            && bytes.starts_with(b"NXOSIMG\0")
            && format(&first) != format(&bytes)
        {
            eprintln!(
                "xtask: warning: system_a of {} holds an image of another format than this build \
                 writes: the guest will refuse it; recreate the disks with `cargo xtask guest --fresh`",
                disk.display()
            );
        }
        return Ok(false);
    }
    anyhow::ensure!(
        bytes.len() as u64 <= SLOT_MIB << 20,
        "{} ({} bytes) does not fit into system_a ({SLOT_MIB} MiB)",
        image.display(),
        bytes.len()
    );
    f.write_all_at(&bytes, off)
        .with_context(|| format!("write system_a of {}", disk.display()))?;
    f.sync_all()?;
    eprintln!(
        "xtask: seeded system_a of {} with {} (factory slot a)",
        disk.display(),
        image.display()
    );
    Ok(true)
}

/// The factory ESP `cargo xtask guest` builds (`build/esp.img`): systemd-boot, loader.conf,
/// the recovery entry and files, and slot a's kernel, initramfs and blessed entry (the boot
/// files of the demo image).
pub fn factory_esp() -> std::path::PathBuf {
    crate::util::build_dir().join("esp.img")
}

/// Create `disk.img` unless it exists (or `fresh`); seed `system_a` with `seed` (the demo
/// image) when that slot is blank, and then the ESP with the [`factory_esp`] (slot a's boot
/// files and entry belong to that image). `seed = None`: no image could be built
/// (stub/placeholder), the slot stays blank and the normal boot will report slot a unusable.
pub fn ensure_disk(path: &Path, fresh: bool, seed: Option<&Path>) -> anyhow::Result<()> {
    create_disk(path, fresh)?;
    match seed {
        Some(img) => {
            if seed_slot_a(path, img)? {
                let esp = factory_esp();
                if esp.is_file() {
                    write_esp(path, &esp)?;
                    eprintln!(
                        "xtask: wrote the factory ESP {} into {} (systemd-boot, slot a, recovery)",
                        esp.display(),
                        path.display()
                    );
                } else {
                    eprintln!(
                        "xtask: {}: stub/placeholder — no factory ESP {} yet (`cargo xtask guest` builds it); the disk does not boot by itself",
                        path.display(),
                        esp.display()
                    );
                }
            }
        }
        None => eprintln!(
            "xtask: {}: stub/placeholder — no demo image, system_a stays blank (slot a will not boot)",
            path.display()
        ),
    }
    Ok(())
}

fn create_disk(path: &Path, fresh: bool) -> anyhow::Result<()> {
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
        // 1 MiB head, two slots, the ESP, 1 MiB for the backup GPT.
        f.set_len((2 * SLOT_MIB + ESP_MIB + 2) << 20)?;
    }
    // Fixed GUIDs: same inputs, same disk.
    let script = format!(
        "label: gpt\nlabel-id: 6E657875-732D-4469-736B-000000000001\n\
         start={a}, size={s}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6E657875-732D-536C-6F74-00000000000A, name=system_a\n\
         size={s}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6E657875-732D-536C-6F74-00000000000B, name=system_b\n\
         size={e}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6E657875-732D-4553-5000-000000000001, name=esp\n",
        s = SLOT_MIB,
        e = ESP_MIB,
        a = SYSTEM_A_START_SECTOR
    );
    eprintln!(
        "$ sfdisk {} <<< (GPT: system_a, system_b, {SLOT_MIB} MiB each; esp, {ESP_MIB} MiB)",
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
        "xtask: created {} (GPT: system_a, system_b, esp)",
        path.display()
    );
    Ok(())
}

/// Write the ESP image `esp` into the `esp` partition of `disk` when its bytes differ. A disk
/// made before the ESP existed is left alone with a hint. Returns whether it wrote.
pub fn write_esp(disk: &Path, esp: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(esp).with_context(|| format!("read {}", esp.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 == ESP_MIB << 20,
        "{} is {} bytes, not the {ESP_MIB} MiB of the esp partition",
        esp.display(),
        bytes.len()
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("open {}", disk.display()))?;
    let len = f.metadata()?.len();
    let off = esp_offset();
    if len < off + (ESP_MIB << 20) + (1 << 20) {
        eprintln!(
            "xtask: warning: {} has no esp partition (made before the boot chain); it boots only \
             through the runner. `cargo xtask guest --fresh` recreates it",
            disk.display()
        );
        return Ok(false);
    }
    let mut old = vec![0u8; bytes.len()];
    f.read_exact_at(&mut old, off)
        .with_context(|| format!("read the esp of {}", disk.display()))?;
    if old == bytes {
        return Ok(false);
    }
    f.write_all_at(&bytes, off)
        .with_context(|| format!("write the esp of {}", disk.display()))?;
    f.sync_all()?;
    Ok(true)
}

/// A new device under `dir`: fresh `state.img` and `disk.img` (slot a and the ESP seeded from
/// `seed`), and the runner configuration for it — its own run directory (console, sockets
/// under `dir/qemu`) and its own fresh NVRAM (`dir/ovmf-vars.fd`).
pub fn fresh_device(dir: &Path, seed: Option<&Path>) -> anyhow::Result<nx_qemu::Config> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    ensure_state(&dir.join("state.img"), true)?;
    ensure_disk(&dir.join("disk.img"), true, seed)?;
    let mut cfg = nx_qemu::Config::new(&crate::util::build_dir());
    cfg.qemu = tool("qemu-system-x86_64")?;
    cfg.state_img = Some(dir.join("state.img"));
    cfg.disk_img = Some(dir.join("disk.img"));
    // Sockets (ports and the UART) follow the run dir.
    cfg.move_run_dir(dir.join("qemu"));
    cfg.fresh_vars(dir.join("ovmf-vars.fd"));
    Ok(cfg)
}
