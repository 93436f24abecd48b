//! `cargo xtask guest [--fresh]`: everything a QEMU run needs, into `build/` (ignored by git),
//! idempotent and cached:
//!
//! - `build/kernel/vmlinuz` + modules in dependency order (see `kernel.rs`);
//! - static guest binaries (`+crt-static`, own target dir `target/guest`) of every guest crate
//!   that has a binary (discovered from `guest/*/Cargo.toml`);
//! - `build/recovery/initrd.cpio` (recovery ramdisk) and `build/initrd.cpio` (normal);
//! - `build/state.img`, `build/disk.img` (kept across runs; `--fresh` recreates);
//! - `build/nexus-os.img`, the demo image, via `nx image build`.

use crate::initramfs::Initramfs;
use crate::util::{self, cargo, run_cmd};
use crate::{disks, kernel};
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The guest target triple (the only one available here; static via `+crt-static`).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Demo image version.
pub const DEMO_VERSION: &str = "1.0.0";

/// Binaries of the recovery ramdisk: `(binary, required)`. `recovery-init` becomes `/init`.
const RECOVERY_BINS: &[(&str, bool)] = &[
    ("recovery-init", true),
    ("recovery-sh", true),
    ("flashd", true),
    ("rebootd", false),
    ("bootctld", false),
    ("nx-recovery", false),
    ("nx-diag", false),
    ("selftest-client", false),
];
/// Binaries of the normal initramfs: `init` becomes `/init`.
const NORMAL_BINS: &[(&str, bool)] = &[
    ("init", true),
    ("rebootd", false),
    ("bootctld", false),
    ("nx-diag", false),
    ("selftest-client", false),
];

/// Arguments of `cargo xtask guest`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Recreate everything: fetch the newest kernel, new state.img / disk.img (wipes /state and
    /// both slots), rebuild the demo image.
    #[arg(long)]
    pub fresh: bool,
    /// Version written into the demo image's /etc/os-release.
    #[arg(long, default_value = DEMO_VERSION)]
    pub demo_version: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            fresh: false,
            demo_version: DEMO_VERSION.to_string(),
        }
    }
}

/// Where `cargo xtask guest` puts things.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub kernel: PathBuf,
    pub recovery_initrd: PathBuf,
    pub normal_initrd: PathBuf,
    pub state_img: PathBuf,
    pub disk_img: PathBuf,
    /// `None` while `nx image build` is not available (stub/placeholder).
    pub demo_image: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = build(&args)?;
    eprintln!("\nxtask: guest ready:");
    eprintln!("  kernel            {}", out.kernel.display());
    eprintln!("  recovery ramdisk  {}", out.recovery_initrd.display());
    eprintln!("  normal initramfs  {}", out.normal_initrd.display());
    eprintln!("  state disk        {}", out.state_img.display());
    eprintln!("  slot disk         {}", out.disk_img.display());
    match &out.demo_image {
        Some(p) => eprintln!("  demo image        {}", p.display()),
        None => {
            eprintln!("  demo image        stub/placeholder (nx image build not available yet)")
        }
    }
    Ok(())
}

/// Build everything (the body of `cargo xtask guest`, used by recovery/demo/ci too).
pub fn build(args: &Args) -> anyhow::Result<Outputs> {
    let build = util::build_dir();
    std::fs::create_dir_all(&build).with_context(|| format!("create {}", build.display()))?;
    util::ensure_tools(util::HOST_TOOLS)?;

    let k = kernel::ensure(&build, args.fresh)?;
    eprintln!(
        "xtask: kernel {} ; modules in load order: {}",
        k.package,
        k.modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );

    let bins = build_guest_binaries()?;

    let recovery = build.join("recovery/initrd.cpio");
    let ramdisk = assemble(&bins, &k, RECOVERY_BINS, "recovery-init", "recovery")?;
    report(
        &recovery,
        util::write_if_changed(&recovery, &ramdisk)?,
        ramdisk.len(),
    );
    let normal = build.join("initrd.cpio");
    let initramfs = assemble(&bins, &k, NORMAL_BINS, "init", "normal")?;
    report(
        &normal,
        util::write_if_changed(&normal, &initramfs)?,
        initramfs.len(),
    );

    let state_img = build.join("state.img");
    disks::ensure_state(&state_img, args.fresh)?;
    let disk_img = build.join("disk.img");
    disks::ensure_disk(&disk_img, args.fresh)?;

    let demo_image = demo_image(&build, &args.demo_version)?;
    Ok(Outputs {
        kernel: k.vmlinuz,
        recovery_initrd: recovery,
        normal_initrd: normal,
        state_img,
        disk_img,
        demo_image,
    })
}

fn report(path: &Path, written: bool, len: usize) {
    let what = if written { "written" } else { "unchanged" };
    eprintln!("xtask: {} {what} ({} KiB)", path.display(), len / 1024);
}

/// Guest crates with binaries: package name → binary names.
pub fn guest_crates() -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    let dir = util::root().join("guest");
    for e in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let cdir = e?.path();
        let manifest = cdir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("parse {}", manifest.display()))?;
        let Some(pkg) = v
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
        else {
            continue;
        };
        let declared: Vec<(String, String)> = v
            .get("bin")
            .and_then(|b| b.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|b| {
                        let name = b.get("name").and_then(|n| n.as_str())?.to_string();
                        let path = b
                            .get("path")
                            .and_then(|p| p.as_str())
                            .map(str::to_string)
                            .unwrap_or_else(|| format!("src/bin/{name}.rs"));
                        Some((name, path))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some((name, path)) = declared.iter().find(|(_, p)| !cdir.join(p).exists()) {
            // A crate being written right now: skip it rather than fail the whole guest build.
            eprintln!(
                "xtask: guest crate {pkg}: binary {name} has no {path} yet; not building {pkg}"
            );
            continue;
        }
        let mut bins: Vec<String> = declared.into_iter().map(|(n, _)| n).collect();
        if bins.is_empty() && cdir.join("src/main.rs").exists() {
            bins.push(pkg.to_string());
        }
        if !bins.is_empty() {
            out.insert(pkg.to_string(), bins);
        }
    }
    Ok(out)
}

/// Build every guest binary statically; returns binary name → path.
fn build_guest_binaries() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let crates = guest_crates()?;
    if crates.is_empty() {
        bail!("no guest crates with binaries under guest/");
    }
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--target-dir",
        "target/guest",
    ]);
    for pkg in crates.keys() {
        cmd.args(["-p", pkg]);
    }
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    run_cmd(&mut cmd).context("static guest build failed")?;
    let dir = util::root()
        .join("target/guest")
        .join(TARGET)
        .join("release");
    let mut out = BTreeMap::new();
    for bins in crates.values() {
        for b in bins {
            let p = dir.join(b);
            let bytes = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            if has_interpreter(&bytes) {
                bail!("{} is dynamically linked; it would not run in the initramfs (is +crt-static applied?)", p.display());
            }
            out.insert(b.clone(), p);
        }
    }
    Ok(out)
}

/// True when an ELF64 file has a `PT_INTERP` program header (dynamic executable).
pub fn has_interpreter(elf: &[u8]) -> bool {
    let rd = |o: usize, n: usize| elf.get(o..o + n);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or([0; 8]));
    let phentsize = u16::from_le_bytes(phentsize.try_into().unwrap_or([0; 2]));
    let phnum = u16::from_le_bytes(phnum.try_into().unwrap_or([0; 2]));
    (0..u64::from(phnum)).any(|i| {
        let off = phoff.saturating_add(i.saturating_mul(u64::from(phentsize)));
        usize::try_from(off)
            .ok()
            .and_then(|o| rd(o, 4))
            .is_some_and(|t| t == 3u32.to_le_bytes())
    })
}

fn assemble(
    bins: &BTreeMap<String, PathBuf>,
    k: &kernel::Kernel,
    list: &[(&str, bool)],
    init: &str,
    kind: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut img = Initramfs::skeleton();
    for &(name, required) in list {
        match bins.get(name) {
            Some(p) if name == init => img.file("init", p, 0o755)?,
            Some(p) => img.file(&format!("bin/{name}"), p, 0o755)?,
            None if required => {
                bail!("guest binary {name} is missing; its crate should be under guest/")
            }
            None => {}
        }
    }
    let mut load = String::from("# load order from .modinfo depends= (cargo xtask guest)\n");
    for (file, path) in &k.modules {
        img.file(&format!("lib/modules/{file}"), path, 0o644)?;
        load.push_str(file);
        load.push('\n');
    }
    img.bytes("lib/modules/load.list", load.into_bytes(), 0o644);
    img.bytes("etc/nexus/ramdisk", format!("{kind}\n").into_bytes(), 0o644);
    img.bytes(
        "etc/nexus/kernel",
        format!("{}\n", k.package).into_bytes(),
        0o644,
    );
    img.to_bytes()
}

/// Build the demo image with `nx image build`; `Ok(None)` (stub/placeholder) while the verb
/// does not work yet.
fn demo_image(build: &Path, version: &str) -> anyhow::Result<Option<PathBuf>> {
    let rootfs = build.join("demo-rootfs");
    let os_release = format!(
        "NAME=\"nexus\"\nID=nexus\nPRETTY_NAME=\"nexus {version}\"\nVERSION=\"{version}\"\nVERSION_ID={version}\n"
    );
    util::write_if_changed(&rootfs.join("etc/os-release"), os_release.as_bytes())?;
    util::write_if_changed(&rootfs.join("etc/hostname"), b"nexus\n")?;
    let out = build.join("nexus-os.img");
    let mut cmd = cargo();
    cmd.args([
        "run", "-q", "-p", "nx-cli", "--bin", "nx", "--", "image", "build", "--rootfs",
    ])
    .arg(&rootfs)
    .args(["--version", version, "--out"])
    .arg(&out);
    match run_cmd(&mut cmd) {
        Ok(()) if out.exists() => Ok(Some(out)),
        Ok(()) => {
            eprintln!(
                "xtask: demo image: stub/placeholder — `nx image build` succeeded but wrote no {}",
                out.display()
            );
            Ok(None)
        }
        Err(e) => {
            eprintln!("xtask: demo image: stub/placeholder — `nx image build` is not usable yet ({e:#}); skipping build/nexus-os.img");
            Ok(None)
        }
    }
}
