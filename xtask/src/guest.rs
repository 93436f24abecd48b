//! `cargo xtask guest [--fresh]`: everything a QEMU run needs, into `build/` (ignored by git),
//! idempotent and cached:
//!
//! - `build/kernel/vmlinuz` + modules in dependency order (see `kernel.rs`);
//! - static guest binaries (`+crt-static`, own target dir `target/guest`) of every guest crate
//!   that has a binary (discovered from `guest/*/Cargo.toml`);
//! - `build/recovery/initrd.cpio` (recovery ramdisk) and `build/initrd.cpio` (normal);
//! - the images, via `nx image build` (deterministic; rewritten only when their bytes change),
//!   each the whole OS of a slot: `rootfs` (squashfs: bootctld, rebootd, selftest-client,
//!   nx-diag, Debian's busybox-static, /etc/os-release and /etc/motd of the version), `kernel`
//!   and `initrd` (the normal initramfs):
//!   `build/nexus-os.img` (the demo image, version 1, the factory image of slot a),
//!   `build/nexus-os-v2.img` (version 2, the update of the e2e scenarios: another version and
//!   message of the day), `build/nexus-os-v3-badkernel.img` (its initrd's `/init` cannot run:
//!   the kernel panics before userspace — the bootloader rollback proof) and
//!   `build/nexus-os-broken.img` (a valid image whose `rootfs` segment is junk, not a file
//!   system: it installs and verifies, but never mounts — the rollback scenario);
//! - `build/state.img`, `build/disk.img` (kept across runs; `--fresh` recreates); a new
//!   disk (or one whose `system_a` was never written) gets the demo image at the start of
//!   `system_a`, so a fresh guest has a bootable, good slot a (bootctld's factory default).

use crate::initramfs::Initramfs;
use crate::util::{self, cargo, run_cmd};
use crate::{disks, esp, kernel};
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The guest target triple (the only one available here; static via `+crt-static`).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Demo image version (the factory image of slot a).
pub const DEMO_VERSION: &str = "1";
/// Version of the update image `build/nexus-os-v2.img`.
pub const V2_VERSION: &str = "2";
/// Version of the broken image `build/nexus-os-broken.img`.
pub const BROKEN_VERSION: &str = "3-broken";
/// Size of the junk `rootfs` segment of the broken image.
const BROKEN_ROOTFS_BYTES: usize = 64 * 1024;

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
/// Binaries of the normal initramfs: `init` becomes `/init`. Everything else of the normal
/// userspace is in the slot's rootfs ([`ROOTFS_BINS`]), which init mounts first.
const NORMAL_BINS: &[(&str, bool)] = &[("init", true)];

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
    /// The version-2 update image (`None`: stub/placeholder, as above).
    pub v2_image: Option<PathBuf>,
    /// The image with an unmountable rootfs (`None`: stub/placeholder, as above).
    pub broken_image: Option<PathBuf>,
    /// The image whose initrd fails before userspace (`None`: stub/placeholder, as above).
    pub badkernel_image: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = build(&args)?;
    eprintln!("\nxtask: guest ready:");
    eprintln!("  kernel            {}", out.kernel.display());
    eprintln!("  recovery ramdisk  {}", out.recovery_initrd.display());
    eprintln!("  normal initramfs  {}", out.normal_initrd.display());
    eprintln!("  state disk        {}", out.state_img.display());
    eprintln!("  slot disk         {}", out.disk_img.display());
    for (what, img) in [
        ("demo image", &out.demo_image),
        ("update image", &out.v2_image),
        ("broken image", &out.broken_image),
        ("bad-kernel image", &out.badkernel_image),
    ] {
        match img {
            Some(p) => eprintln!("  {what:<17} {}", p.display()),
            None => eprintln!("  {what:<17} stub/placeholder (nx image build not available yet)"),
        }
    }
    Ok(())
}

/// Build everything (the body of `cargo xtask guest`, used by recovery/demo/ci too).
pub fn build(args: &Args) -> anyhow::Result<Outputs> {
    let build = util::build_dir();
    std::fs::create_dir_all(&build).with_context(|| format!("create {}", build.display()))?;
    util::ensure_host_tools()?;

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
    let ramdisk = assemble(
        &bins,
        &k,
        &k.modules,
        RECOVERY_BINS,
        "recovery-init",
        "recovery",
    )?
    .to_bytes()?;
    report(
        &recovery,
        util::write_if_changed(&recovery, &ramdisk)?,
        ramdisk.len(),
    );
    let normal = build.join("initrd.cpio");
    let mut initramfs = assemble(&bins, &k, &k.normal_modules, NORMAL_BINS, "init", "normal")?;
    initramfs.bytes(
        nx_contract::loader::INITRD_VERSION_FILE,
        format!("{}\n", args.demo_version).into_bytes(),
        0o644,
    );
    // The update's own initramfs: the same, stamped with its version (init prints it, so
    // an update visibly boots the new slot's initramfs).
    let mut initramfs_v2 = assemble(&bins, &k, &k.normal_modules, NORMAL_BINS, "init", "normal")?;
    initramfs_v2.bytes(
        nx_contract::loader::INITRD_VERSION_FILE,
        format!("{V2_VERSION}\n").into_bytes(),
        0o644,
    );
    let normal_v2 = build.join("images.tmp/initrd-v2.cpio");
    let initramfs_v2 = initramfs_v2.to_bytes()?;
    util::write_if_changed(&normal_v2, &initramfs_v2)?;
    let initramfs = initramfs.to_bytes()?;
    report(
        &normal,
        util::write_if_changed(&normal, &initramfs)?,
        initramfs.len(),
    );

    let busybox = crate::userland::busybox(&build, args.fresh)?;
    let images = build_images(
        &build,
        &args.demo_version,
        &OsParts {
            kernel: &k.vmlinuz,
            initrd: &normal,
            initrd_v2: &normal_v2,
            bins: &bins,
            busybox: &busybox,
        },
    )?;

    let state_img = build.join("state.img");
    disks::ensure_state(&state_img, args.fresh)?;
    let (device, slot_a) = esp_spec(&k.vmlinuz, &normal, &recovery, &args.demo_version);
    let factory = esp::Esp {
        files: [device.files.clone(), slot_a.files].concat(),
        texts: [device.texts.clone(), slot_a.texts].concat(),
    };
    esp::build(&factory, &disks::factory_esp())?;
    let disk_img = build.join("disk.img");
    let existed = disk_img.exists() && !args.fresh;
    disks::ensure_disk(&disk_img, args.fresh, images.demo.as_deref())?;
    if existed {
        // The device's own part follows the build; the slots' boot files and entries are
        // the device's (only flashing changes them).
        esp::refresh(&disk_img, disks::esp_offset(), &device)?;
    }
    ensure_vars(&build.join("ovmf-vars.fd"), args.fresh)?;

    Ok(Outputs {
        kernel: k.vmlinuz,
        recovery_initrd: recovery,
        normal_initrd: normal,
        state_img,
        disk_img,
        demo_image: images.demo,
        v2_image: images.v2,
        broken_image: images.broken,
        badkernel_image: images.badkernel,
    })
}

/// The device's EFI variable store (its NVRAM: boot counting's one-shot and default entry live
/// there), a copy of OVMF's empty template; kept across runs like the disks.
fn ensure_vars(path: &Path, fresh: bool) -> anyhow::Result<()> {
    if path.exists() && !fresh {
        return Ok(());
    }
    let tmp = path.with_extension("fd.tmp");
    std::fs::copy(crate::host_tools::OVMF_VARS, &tmp)
        .with_context(|| format!("copy {}", crate::host_tools::OVMF_VARS))?;
    std::fs::rename(&tmp, path).with_context(|| format!("create {}", path.display()))?;
    eprintln!(
        "xtask: created {} (the device's EFI variables)",
        path.display()
    );
    Ok(())
}

/// What the factory ESP holds: the device's part (bootloader, loader.conf, the recovery
/// kernel, ramdisk and entry) and slot a's boot files and blessed entry (the demo image's).
fn esp_spec(
    kernel: &Path,
    normal: &Path,
    recovery: &Path,
    demo_version: &str,
) -> (esp::Esp, esp::Esp) {
    use nx_contract::loader as l;
    let device = esp::Esp {
        files: vec![
            (
                l::BOOTLOADER_EFI.into(),
                PathBuf::from(crate::host_tools::SYSTEMD_BOOT_EFI),
            ),
            (
                format!("{}/{}", l::RECOVERY_DIR, l::KERNEL_FILE),
                kernel.to_path_buf(),
            ),
            (
                format!("{}/{}", l::RECOVERY_DIR, l::INITRD_FILE),
                recovery.to_path_buf(),
            ),
        ],
        texts: vec![
            (l::LOADER_CONF.into(), l::loader_conf()),
            (
                format!("{}/{}.conf", l::ENTRIES_DIR, l::RECOVERY_ENTRY_ID),
                l::recovery_entry_text(),
            ),
        ],
    };
    let slot_a = esp::Esp {
        files: vec![
            (
                format!("{}/{}", l::slot_dir('a'), l::KERNEL_FILE),
                kernel.to_path_buf(),
            ),
            (
                format!("{}/{}", l::slot_dir('a'), l::INITRD_FILE),
                normal.to_path_buf(),
            ),
        ],
        texts: vec![(
            format!("{}/{}.conf", l::ENTRIES_DIR, l::slot_entry_id(1, 'a')),
            l::slot_entry_text('a', demo_version),
        )],
    };
    (device, slot_a)
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

/// `cargo build` of static guest binaries (add `-p CRATE` arguments): release, `+crt-static`,
/// stripped, in `target/guest`.
pub fn guest_cargo_build() -> std::process::Command {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--target-dir",
        "target/guest",
    ]);
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    cmd
}

/// Where [`guest_cargo_build`] puts the binaries.
pub fn guest_release_dir() -> PathBuf {
    util::root()
        .join("target/guest")
        .join(TARGET)
        .join("release")
}

/// Build every guest binary statically; returns binary name → path.
fn build_guest_binaries() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let crates = guest_crates()?;
    if crates.is_empty() {
        bail!("no guest crates with binaries under guest/");
    }
    let mut cmd = guest_cargo_build();
    for pkg in crates.keys() {
        cmd.args(["-p", pkg]);
    }
    run_cmd(&mut cmd).context("static guest build failed")?;
    let dir = guest_release_dir();
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
    modules: &[(String, PathBuf)],
    list: &[(&str, bool)],
    init: &str,
    kind: &str,
) -> anyhow::Result<Initramfs> {
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
    for (file, path) in modules {
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
    Ok(img)
}

/// The images `cargo xtask guest` builds (`None`: stub/placeholder, `nx image build` failed).
#[derive(Debug, Clone, Default)]
pub struct Images {
    pub demo: Option<PathBuf>,
    pub v2: Option<PathBuf>,
    pub broken: Option<PathBuf>,
    pub badkernel: Option<PathBuf>,
}

/// What every image is made of: the whole OS of a slot.
#[derive(Debug, Clone, Copy)]
pub struct OsParts<'a> {
    /// Segment `kernel`.
    pub kernel: &'a Path,
    /// Segment `initrd`: the normal initramfs (our init).
    pub initrd: &'a Path,
    /// The `initrd` of the update image (the same, stamped with its version).
    pub initrd_v2: &'a Path,
    /// Static guest binaries by name (the rootfs takes [`ROOTFS_BINS`]).
    pub bins: &'a BTreeMap<String, PathBuf>,
    /// Debian's static busybox (the userland's shell and tools).
    pub busybox: &'a Path,
}

/// The normal userspace in the `rootfs` segment (`/bin/<name>`).
pub const ROOTFS_BINS: &[&str] = &["bootctld", "rebootd", "selftest-client", "nx-diag"];
/// busybox applets linked in `/bin` of the rootfs (the rest run as `busybox <applet>`).
const BUSYBOX_LINKS: &[&str] = &["sh", "ls", "cat", "mount", "ps", "uname"];
/// Version of `build/nexus-os-v3-badkernel.img`.
pub const BADKERNEL_VERSION: &str = "3-badkernel";

fn os_release(version: &str) -> String {
    format!(
        "NAME=\"nexus\"\nID=nexus\nPRETTY_NAME=\"nexus {version}\"\nVERSION=\"{version}\"\nVERSION_ID={version}\n"
    )
}

/// The message of the day of a version: what a user sees change after an update.
pub fn motd(version: &str) -> String {
    match version {
        V2_VERSION => format!("nexus {version}: A/B updates with automatic rollback, now with the whole OS in every slot\n"),
        _ => format!("nexus {version}\n"),
    }
}

/// Lay out the rootfs tree of `version` at `dir` (recreated: nothing stale survives).
fn rootfs_tree(dir: &Path, version: &str, parts: &OsParts<'_>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = dir.join(rel);
        util::write_if_changed(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", p.display()))
    };
    put("etc/os-release", os_release(version).as_bytes(), 0o644)?;
    put("etc/hostname", b"nexus\n", 0o644)?;
    put("etc/motd", motd(version).as_bytes(), 0o644)?;
    for name in ROOTFS_BINS {
        let src = parts.bins.get(*name).with_context(|| {
            format!("guest binary {name} is missing (its crate is under guest/)")
        })?;
        let bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
        put(&format!("bin/{name}"), &bytes, 0o755)?;
    }
    let bb = std::fs::read(parts.busybox)
        .with_context(|| format!("read {}", parts.busybox.display()))?;
    put("bin/busybox", &bb, 0o755)?;
    for applet in BUSYBOX_LINKS {
        let link = dir.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    for d in ["dev", "proc", "sys", "run", "tmp", "state"] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("create {d} in {}", dir.display()))?;
    }
    Ok(())
}

/// An initramfs whose `/init` cannot run: the kernel finds no working init and panics before
/// any userspace (the `v3-badkernel` image of the rollback proof).
fn bad_initrd() -> anyhow::Result<Vec<u8>> {
    let mut img = Initramfs::skeleton();
    img.bytes("init", b"#!/nonexistent/interpreter\n".to_vec(), 0o755);
    img.bytes("etc/nexus/ramdisk", b"badkernel\n".to_vec(), 0o644);
    img.to_bytes()
}

/// Deterministic junk (xorshift64), `len` bytes: not a file system of any kind.
pub fn junk(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = seed | 1;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(b.get(..chunk.len()).unwrap_or_default());
    }
    data
}

/// `--segment NAME=FILE`.
fn segment_arg(name: &str, file: &Path) -> std::ffi::OsString {
    let mut seg = std::ffi::OsString::from(format!("{name}="));
    seg.push(file.as_os_str());
    seg
}

/// Build the four images with `nx image build` (one `cargo build` of `nx`, then the binary).
/// Each carries the whole OS — `rootfs` (squashfs of the normal userspace), `kernel`,
/// `initrd` — and is built into `build/images.tmp/`, copied over its final path only when its
/// bytes changed, so an unchanged image keeps its mtime.
pub fn build_images(
    build: &Path,
    demo_version: &str,
    parts: &OsParts<'_>,
) -> anyhow::Result<Images> {
    let nx = match run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"])) {
        Ok(()) => util::host_bin("nx"),
        Err(e) => {
            eprintln!("xtask: images: stub/placeholder — `nx` does not build ({e:#}); no images");
            return Ok(Images::default());
        }
    };
    let tmp = build.join("images.tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let key = crate::keys::ensure_dev_key(build)?;
    let kernel = segment_arg("kernel", parts.kernel);
    let initrd = segment_arg("initrd", parts.initrd);
    let whole_os = |name: &str,
                    version: &str,
                    initrd: &std::ffi::OsString|
     -> anyhow::Result<Option<PathBuf>> {
        let tree = build.join("rootfs").join(name);
        rootfs_tree(&tree, version, parts)?;
        Ok(image(
            &nx,
            &tmp,
            &build.join(format!("{name}.img")),
            version,
            &key,
            |c| {
                c.arg("--rootfs").arg(&tree);
                c.arg("--segment").arg(&kernel).arg("--segment").arg(initrd);
            },
        ))
    };
    let demo = whole_os("nexus-os", demo_version, &initrd)?;
    let v2 = whole_os(
        "nexus-os-v2",
        V2_VERSION,
        &segment_arg("initrd", parts.initrd_v2),
    )?;

    let bad_initrd_file = tmp.join("badkernel-initrd.cpio");
    util::write_if_changed(&bad_initrd_file, &bad_initrd()?)?;
    let badkernel = whole_os(
        "nexus-os-v3-badkernel",
        BADKERNEL_VERSION,
        &segment_arg("initrd", &bad_initrd_file),
    )?;

    let junk_file = tmp.join("broken-rootfs.bin");
    util::write_if_changed(&junk_file, &junk(BROKEN_ROOTFS_BYTES, 0x6272_6f6b_656e))?;
    let broken = image(
        &nx,
        &tmp,
        &build.join("nexus-os-broken.img"),
        BROKEN_VERSION,
        &key,
        |c| {
            c.arg("--segment").arg(segment_arg("rootfs", &junk_file));
            c.arg("--segment")
                .arg(&kernel)
                .arg("--segment")
                .arg(&initrd);
        },
    );
    Ok(Images {
        demo,
        v2,
        broken,
        badkernel,
    })
}

/// The anti-rollback counter of each image this build makes: v1 → 1, v2 → 2, the broken and
/// bad-kernel updates → 3 (so a device that confirmed v2 still takes them, to test rollback).
pub fn security_version(version: &str) -> u64 {
    match version {
        DEMO_VERSION => 1,
        V2_VERSION => 2,
        _ => 3,
    }
}

/// One `nx image build` (signed with the development key); `None` (with a stub/placeholder
/// line) when it fails.
fn image(
    nx: &Path,
    tmp: &Path,
    out: &Path,
    version: &str,
    key: &Path,
    inputs: impl FnOnce(&mut std::process::Command),
) -> Option<PathBuf> {
    let name = out.file_name().unwrap_or_default();
    let staged = tmp.join(name);
    let mut cmd = std::process::Command::new(nx);
    cmd.args(["image", "build", "--version", version])
        .args(["--security-version", &security_version(version).to_string()])
        .arg("--sign")
        .arg(key)
        .arg("--out")
        .arg(&staged)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdout(std::process::Stdio::null());
    inputs(&mut cmd);
    let built = run_cmd(&mut cmd).and_then(|()| {
        let bytes = std::fs::read(&staged).with_context(|| format!("read {}", staged.display()))?;
        let written = util::write_if_changed(out, &bytes)?;
        report(out, written, bytes.len());
        Ok(())
    });
    match built {
        Ok(()) => Some(out.to_path_buf()),
        Err(e) => {
            eprintln!(
                "xtask: {}: stub/placeholder — `nx image build` is not usable ({e:#})",
                out.display()
            );
            None
        }
    }
}
