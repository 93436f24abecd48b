//! `cargo xtask bench guest` (and plain `cargo xtask bench`): the speed claim measured in a
//! real QEMU guest, in one run, on the same virtio-serial link into the same slot partition
//! (`system_b`):
//!
//! - (a) raw copy of a dense image file by `rawrecv` (guest/rawrecv: 1 MiB port reads,
//!   O_DIRECT writes, fdatasync — the physical limit),
//! - (b) `nx flash send` of a dense image, (c) of an image with 10% data, (d) an immediate
//!   re-flash of the identical image, (e) a resume after a cut at 50% (nx killed),
//! - (f) boot to `recovery: ready` (QEMU start → marker on the console),
//! - plus profile rows by rawrecv that split the raw path (the link alone, the link + SHA-256,
//!   the link + SHA-256 of 1 MiB pieces on every vCPU, the staging pattern of flashd: a
//!   buffered file on /state + fdatasync),
//! - (b1) (b) again in a second boot of the same guest with `nexus.verify_threads=1` on the
//!   kernel command line (recovery-init passes `--verify-threads 1` to flashd): what the
//!   verification pool buys in the dense case. Fresh disks for that boot, so it starts from
//!   the same state as (b); the second QEMU is killed when the row ends, as the first.
//!
//! Peak RSS: nx from its own `VmHWM` (sampled from `/proc/<pid>/status` while it runs; `wait4`'s
//! `ru_maxrss` would report xtask's peak, which a spawned child inherits), flashd from its log line
//! `flashd (log): rss peak_kib=<n>` (VmHWM, printed after every install; flashd lives for the
//! whole run, so each figure is the peak so far).
//!
//! The guest boots the normal recovery ramdisk with a second cpio archive appended
//! (`/bin/rawrecv`, and `/bin/flashd` = `bench-flashd`, which execs the real flashd moved to
//! `/bin/flashd.real` with `--install-partition system_b` instead of `--install-slot auto`:
//! the same receive/verify/install into the same partition without the slot activation and
//! the reboot after each install) and `rdinit=/bin/rawrecv`: rawrecv forks its receiver and
//! execs the real `/init`, so the boot is the recovery boot (recovery-init as PID 1, flashd,
//! shell). A dedicated port `com.nexus.bench` (`build/bench/qemu/bench.sock`) carries the raw
//! copies. Everything lives under `build/bench/` (fresh state.img and disk.img every run).
//! See docs/benchmarks.md.

use super::report::{self, Case};
use super::{make_image, Bins, MIB};
use crate::util::{self, cargo, run_cmd};
use anyhow::{bail, Context};
use nx_contract::markers;
use nx_contract::markers::flashd as fm;
use nx_qemu::{Config, Runner};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The benchmark's virtio-serial port and its host socket (under the run dir).
pub const BENCH_PORT: nx_contract::PortSpec = nx_contract::ports::BENCH;
/// Boot / transfer time budget.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// `cargo xtask bench guest`.
#[derive(clap::Args, Debug, Clone)]
pub struct GuestArgs {
    /// Size of the images, MiB (the slot partition holds 512).
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Guest vCPUs (`-smp`; 2 like every runner boot).
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Skip the rawrecv profile rows (link only, link + SHA-256, /state staging pattern).
    #[arg(long)]
    pub no_profile: bool,
    /// Do not rewrite docs/benchmarks.md and docs/benchmarks.svg.
    #[arg(long)]
    pub no_docs: bool,
    /// Use what is built (do not run `cargo xtask guest` and `cargo build --release`).
    #[arg(long)]
    pub no_build: bool,
    /// Echo the guest console.
    #[arg(long)]
    pub echo: bool,
    /// Extra arguments for every `nx flash send` (e.g. `--nx-arg=--compress --nx-arg=none`).
    #[arg(long = "nx-arg", allow_hyphen_values = true)]
    pub nx_args: Vec<String>,
    /// Cases to run, comma-separated: a (raw), p (profile rows), b, b1 (b with flashd verifying
    /// on one thread: a second boot), c, d (needs c), e.
    #[arg(long, value_delimiter = ',', default_value = "a,p,b,b1,c,d,e")]
    pub cases: Vec<String>,
}

impl Default for GuestArgs {
    fn default() -> Self {
        GuestArgs {
            size_mib: 256,
            smp: 2,
            no_profile: false,
            no_docs: false,
            no_build: false,
            echo: false,
            nx_args: Vec::new(),
            cases: ["a", "p", "b", "b1", "c", "d", "e"]
                .map(String::from)
                .to_vec(),
        }
    }
}

pub fn run(a: GuestArgs) -> anyhow::Result<()> {
    if a.size_mib == 0 || a.size_mib > 500 {
        bail!("--size-mib must be 1..=500 (the slot partition holds 512 MiB)");
    }
    let outs = if a.no_build {
        None
    } else {
        let o = crate::guest::build(&crate::guest::Args::default())?;
        run_cmd(cargo().args(["build", "--release", "-p", "nx-cli", "--bin", "nx"]))?;
        Some(o)
    };
    let root = util::root();
    let build = util::build_dir();
    let bins = Bins {
        nx: util::host_release_dir().join("nx"),
        flashd: PathBuf::new(),
    };
    let guest_bin = root
        .join("target/guest")
        .join(crate::guest::TARGET)
        .join("release");
    for (what, p) in [
        ("nx", bins.nx.clone()),
        ("rawrecv", guest_bin.join("rawrecv")),
        ("bench-flashd", guest_bin.join("bench-flashd")),
        ("flashd", guest_bin.join("flashd")),
    ] {
        if !p.exists() {
            bail!(
                "{what} ({}) is missing: run without --no-build",
                p.display()
            );
        }
    }
    let dir = build.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    // Images: deterministic content, rebuilt when missing or older than nx.
    let size = a.size_mib * MIB;
    let image = |name: &str, data: f64, seed: u64| -> anyhow::Result<PathBuf> {
        let p = dir.join(format!("{name}-{}m.img", a.size_mib));
        if fresh_enough(&p, &bins.nx) {
            return Ok(p);
        }
        let built = make_image(&bins, &dir, name, size, data, seed)?;
        std::fs::rename(&built, &p)?;
        Ok(p)
    };
    eprintln!("xtask: bench guest: images of {} MiB", a.size_mib);
    let dense = image("dense", 1.0, 1)?;
    let sparse = image("sparse", 0.1, 2)?;
    let resume_img = image("resume", 1.0, 3)?;

    // Fresh disks, the bench ramdisk.
    let state_img = dir.join("state.img");
    let disk_img = dir.join("disk.img");
    crate::disks::ensure_state(&state_img, true)?;
    let demo = outs
        .as_ref()
        .and_then(|o| o.demo_image.clone())
        .or_else(|| Some(build.join("nexus-os.img")).filter(|p| p.exists()));
    crate::disks::ensure_disk(&disk_img, true, demo.as_deref())?;
    let ramdisk = dir.join("recovery-bench.cpio");
    write_bench_ramdisk(&build.join("recovery/initrd.cpio"), &guest_bin, &ramdisk)?;

    let mut cfg = Config::new(&build);
    cfg.qemu = util::tool("qemu-system-x86_64")?;
    cfg.recovery_initrd = ramdisk;
    // The bench ramdisk is loaded directly (the firmware would boot the ESP's recovery):
    // these runs measure flashing, not booting.
    cfg.uefi = None;
    cfg.state_img = Some(state_img.clone());
    cfg.disk_img = Some(disk_img.clone());
    // Sockets (ports and the UART) follow the run dir.
    cfg.move_run_dir(dir.join("qemu"));
    cfg = cfg.with_port(BENCH_PORT.name, BENCH_PORT.socket);
    cfg.recovery = true;
    // A reboot would boot without rdinit's target: end the run instead.
    cfg.follow_reboots = false;
    cfg.extra_cmdline.push("rdinit=/bin/rawrecv".into());
    // As for every runner boot: NX_QEMU_APPEND adds kernel command-line words.
    if let Ok(extra) = std::env::var("NX_QEMU_APPEND") {
        cfg.extra_cmdline
            .extend(extra.split_whitespace().map(str::to_string));
    }
    cfg.smp = a.smp.max(1);
    cfg.echo = a.echo;
    let flash_sock = cfg
        .port_socket(nx_contract::ports::FLASH.name)
        .context("no flash port")?
        .to_path_buf();
    let bench_sock = cfg
        .port_socket(BENCH_PORT.name)
        .context("no bench port")?
        .to_path_buf();

    // (b1): the same guest booted again with flashd verifying on one thread.
    let cfg_b1 = a.cases.iter().any(|c| c == "b1").then(|| {
        let mut c = cfg.clone();
        c.extra_cmdline.push(format!(
            "{}={}",
            nx_contract::loader::VERIFY_THREADS_OPTION,
            B1_VERIFY_THREADS
        ));
        c
    });

    let load_before = loadavg();
    eprintln!(
        "xtask: bench guest: booting recovery (smp {}, console {})",
        cfg.smp,
        cfg.console_log().display()
    );
    let runner = Runner::start(cfg)?;
    let ctx = Ctx {
        runner: &runner,
        nx: bins.nx.clone(),
        flash_sock: flash_sock.clone(),
        bench_sock: bench_sock.clone(),
        dir: dir.clone(),
        nx_args: a.nx_args.clone(),
        host_digests: std::cell::RefCell::new(None),
    };
    let result = measure(&ctx, &a, &dense, &sparse, &resume_img);
    if result.is_err() {
        print_tail(&runner);
    }
    drop(ctx);
    // QEMU is killed here (Runner's Drop), on success and on error alike.
    drop(runner);
    let mut m = result?;

    if let Some(cfg) = cfg_b1 {
        // Fresh disks: (b1) starts from what (b) found (no installed image to skip against).
        crate::disks::ensure_state(&state_img, true)?;
        crate::disks::ensure_disk(&disk_img, true, demo.as_deref())?;
        eprintln!(
            "xtask: bench guest: (b1) booting recovery again with {}={} (console {})",
            nx_contract::loader::VERIFY_THREADS_OPTION,
            B1_VERIFY_THREADS,
            cfg.console_log().display()
        );
        let runner = Runner::start(cfg)?;
        let ctx = Ctx {
            runner: &runner,
            nx: bins.nx.clone(),
            flash_sock,
            bench_sock,
            dir: dir.clone(),
            nx_args: a.nx_args.clone(),
            host_digests: std::cell::RefCell::new(None),
        };
        let result = measure_b1(&ctx, &dense);
        if result.is_err() {
            print_tail(&runner);
        }
        drop(ctx);
        // The second QEMU is killed here too, whatever happened.
        drop(runner);
        let b1 = result?;
        // Right after (b) in the table.
        let at = m
            .cases
            .iter()
            .position(|c| c.key == "b")
            .map_or(m.cases.len(), |i| i + 1);
        m.cases.insert(at, b1);
    }
    eprintln!("xtask: bench guest: (g) the boot chain of a fresh device (normal, then recovery)");
    m.boot_chain = super::boot::measure(&dir.join("boot"))?;
    m.load_before = load_before;
    m.load_after = loadavg();
    m.smp = a.smp.max(1);

    let text = report::table(&m);
    println!("\n{text}");
    if !a.no_docs {
        report::write_docs(&root.join("docs"), &m)?;
        eprintln!("xtask: bench guest: wrote docs/benchmarks.md and docs/benchmarks.svg");
    }
    Ok(())
}

pub(super) fn fresh_enough(img: &Path, nx: &Path) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(img), mtime(nx)) {
        (Some(i), Some(n)) => i >= n,
        _ => false,
    }
}

/// The recovery ramdisk with a second newc archive appended (the kernel unpacks concatenated
/// archives in order, later files replace earlier ones; the first is padded to 512 bytes):
/// `/bin/rawrecv`, and `/bin/flashd` = `bench-flashd` which execs the real flashd (moved to
/// `/bin/flashd.real`) with `--install-partition system_b` instead of `--install-slot auto` —
/// the same receive/verify/install into the same partition, without the slot activation and
/// reboot after each install.
pub(super) fn write_bench_ramdisk(
    recovery: &Path,
    guest_bin: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(recovery)
        .with_context(|| format!("read {} (run cargo xtask guest)", recovery.display()))?;
    while bytes.len() % 512 != 0 {
        bytes.push(0);
    }
    let mut extra = crate::initramfs::Initramfs::new();
    extra.file("bin/rawrecv", &guest_bin.join("rawrecv"), 0o755)?;
    extra.file("bin/flashd", &guest_bin.join("bench-flashd"), 0o755)?;
    extra.file("bin/flashd.real", &guest_bin.join("flashd"), 0o755)?;
    bytes.extend_from_slice(&extra.to_bytes()?);
    std::fs::write(out, &bytes).with_context(|| format!("write {}", out.display()))
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// flashd's `--verify-threads` in the (b1) boot.
const B1_VERIFY_THREADS: u32 = 1;

struct Ctx<'a> {
    runner: &'a Runner,
    nx: PathBuf,
    flash_sock: PathBuf,
    bench_sock: PathBuf,
    dir: PathBuf,
    nx_args: Vec<String>,
    /// What rawrecv's SHA-256 digests of the dense image must be (computed once, on the host).
    host_digests: std::cell::RefCell<Option<HostDigests>>,
}

fn print_tail(r: &Runner) {
    eprintln!("xtask: bench guest: last console lines:");
    for l in r.tail(30) {
        eprintln!("  | {l}");
    }
}

/// The host's view of an image: its SHA-256 (`hash=sha256`) and the SHA-256 over the SHA-256
/// of its 1 MiB pieces (`hash=sha256-par`), computed in one pass.
struct HostDigests {
    img: PathBuf,
    whole: String,
    pieces: String,
}

impl HostDigests {
    fn of(img: &Path) -> anyhow::Result<HostDigests> {
        use sha2::{Digest, Sha256};
        let piece = nx_contract::defaults::CHUNK as usize;
        let mut f = std::fs::File::open(img).with_context(|| format!("open {}", img.display()))?;
        let (mut whole, mut outer) = (Sha256::new(), Sha256::new());
        let mut buf = vec![0u8; piece];
        loop {
            // Whole pieces (read until full or EOF): the guest cuts from the first byte.
            let mut got = 0;
            while got < piece {
                let n = f
                    .read(buf.get_mut(got..).unwrap_or_default())
                    .with_context(|| format!("read {}", img.display()))?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                break;
            }
            let data = buf.get(..got).unwrap_or_default();
            whole.update(data);
            outer.update(Sha256::digest(data));
            if got < piece {
                break;
            }
        }
        Ok(HostDigests {
            img: img.to_path_buf(),
            whole: hex::encode(whole.finalize()),
            pieces: hex::encode(outer.finalize()),
        })
    }

    /// The digest rawrecv must report for `hash` (`None`: not a SHA-256 kind).
    fn want(&self, hash: &str) -> Option<&str> {
        match hash {
            "sha256" | "1" => Some(&self.whole),
            "sha256-par" => Some(&self.pieces),
            _ => None,
        }
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A boot that reached `recovery: ready`, rawrecv and flashd ready.
struct Booted {
    /// The host instant of the boot's start.
    boot0: Instant,
    /// QEMU start → `recovery: ready`.
    ready: Duration,
    /// recovery-init's uptime at ready.
    guest_uptime: Option<f64>,
}

fn wait_ready(r: &Runner) -> anyhow::Result<Booted> {
    let ready = r
        .wait_for(markers::recovery::READY_PREFIX, STEP_TIMEOUT)
        .context("recovery did not become ready")?;
    // The host instant of the boot's start (the marker was awaited live: accurate to ms), to
    // place console lines on the host clock.
    let boot0 = Instant::now()
        .checked_sub(ready.since_boot)
        .unwrap_or_else(Instant::now);
    // recovery-init prints its uptime right after the ready marker.
    wait_console(
        r,
        markers::pid1::uptime_prefix("recovery").as_str(),
        Duration::from_secs(10),
    )?;
    let guest_uptime = r
        .grep(markers::pid1::uptime_prefix("recovery").as_str())
        .last()
        .and_then(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()));
    wait_console(r, markers::rawrecv::READY_PREFIX, Duration::from_secs(60))?;
    wait_console(r, "flashd: ready", Duration::from_secs(60))?;
    Ok(Booted {
        boot0,
        ready: ready.since_boot,
        guest_uptime,
    })
}

/// (b1): in the boot with `nexus.verify_threads=1`, check that recovery-init passed it on,
/// then flash the dense image as (b) does.
fn measure_b1(ctx: &Ctx, dense: &Path) -> anyhow::Result<Case> {
    let r = ctx.runner;
    let booted = wait_ready(r)?;
    let applied = markers::recovery::verify_threads(B1_VERIFY_THREADS);
    if !r.console_contains(applied.as_str()) {
        bail!(
            "(b1) recovery-init did not print {:?}: flashd does not verify on {B1_VERIFY_THREADS} thread(s) in this boot",
            applied.as_str()
        );
    }
    let name = format!("nx flash send, dense, verification on {B1_VERIFY_THREADS} thread");
    eprintln!("xtask: bench guest: (b1) {name}");
    flash_case(ctx, booted.boot0, "b1", name, dense).map(|(c, _)| c)
}

/// One `nx flash send` case: nx's wall clock and peak RSS, flashd's peak RSS after it, the
/// guest's timeline in the note.
fn flash_case(
    ctx: &Ctx,
    boot0: Instant,
    key: &'static str,
    name: String,
    img: &Path,
) -> anyhow::Result<(Case, Done)> {
    let r = ctx.runner;
    let before = rss_lines(r);
    let x = nx_send(ctx, img, None)?;
    if x.code != 0 {
        bail!(
            "({key}) nx flash send failed (exit {}): {}",
            x.code,
            x.stderr.trim()
        );
    }
    let fd = flashd_rss_after(r, before)?;
    let done = Done::parse(&x.stdout);
    // An identical re-flash (d) writes nothing: no `wrote seg=` line.
    let tl = timeline(r, key != "d", boot0, x.started)?;
    let case = Case {
        key,
        name,
        bytes: file_len(img),
        time: x.wall,
        wire: done.wire,
        flashd_kib: fd,
        nx_kib: Some(x.maxrss_kib),
        note: format!("{}; {tl}", done.describe()),
    };
    Ok((case, done))
}

fn measure(
    ctx: &Ctx,
    a: &GuestArgs,
    dense: &Path,
    sparse: &Path,
    resume_img: &Path,
) -> anyhow::Result<report::Measured> {
    let r = ctx.runner;
    let booted = wait_ready(r)?;
    let boot0 = booted.boot0;
    let want = |k: &str| a.cases.iter().any(|c| c == k);
    let mut m = report::Measured {
        size: file_len(dense),
        boot: booted.ready,
        guest_uptime: booted.guest_uptime,
        ..Default::default()
    };
    let len = file_len(dense);

    // (a) the physical limit.
    if want("a") {
        eprintln!("xtask: bench guest: (a) raw copy, dense");
        let raw = raw_copy(ctx, dense, "dd", "0", "part")?;
        m.raw = Some(raw.time);
        m.cases.push(Case {
            key: "a",
            name: "raw copy (rawrecv, dd-style, O_DIRECT)".into(),
            bytes: len,
            time: raw.time,
            wire: len,
            flashd_kib: None,
            nx_kib: None,
            note: raw.detail,
        });
    }
    if want("p") && !a.no_profile {
        for (key, name, mode, hash, sink) in [
            (
                "p1",
                "profile: raw, reader/writer threads",
                "pipe",
                "0",
                "part",
            ),
            (
                "p2",
                "profile: link only (port → /dev/null)",
                "dd",
                "0",
                "null",
            ),
            (
                "p3",
                "profile: link + SHA-256 in the guest",
                "dd",
                "sha256",
                "null",
            ),
            (
                "p4",
                "profile: link + CRC-32 in the guest",
                "dd",
                "crc32",
                "null",
            ),
            (
                "p5",
                "profile: buffered file on /state + fdatasync",
                "dd",
                "0",
                "state",
            ),
            (
                "p6",
                "profile: link + SHA-256 on all vCPUs (1 MiB pieces)",
                "dd",
                "sha256-par",
                "null",
            ),
        ] {
            eprintln!("xtask: bench guest: {name}");
            let x = raw_copy(ctx, dense, mode, hash, sink)?;
            m.cases.push(Case {
                key,
                name: name.into(),
                bytes: len,
                time: x.time,
                wire: len,
                flashd_kib: None,
                nx_kib: None,
                note: x.detail,
            });
        }
    }

    // (b)–(d)
    for (key, name, img) in [
        ("b", "nx flash send, dense", dense),
        ("c", "nx flash send, 10% data", sparse),
        ("d", "re-flash of the identical image (c)", sparse),
    ] {
        if !want(key) {
            continue;
        }
        eprintln!("xtask: bench guest: ({key}) {name}");
        let (case, done) = flash_case(ctx, boot0, key, name.into(), img)?;
        let wall = case.time;
        m.cases.push(case);
        if key == "b" {
            m.full_dense = Some(wall);
            m.dense_wire = Some(done.wire);
        }
        if key == "c" {
            m.full_sparse = Some(wall);
        }
    }

    if !want("e") {
        return Ok(m);
    }
    // (e) cut at 50%, then the same command again.
    eprintln!("xtask: bench guest: (e) resume after a cut at 50%");
    let img_len = file_len(resume_img);
    let relay_sock = ctx.dir.join("qemu/relay.sock");
    let (counter, relay) = relay_start(&relay_sock, &ctx.flash_sock)?;
    let c2 = counter.clone();
    let cut_at = img_len / 2;
    let first = nx_send(
        ctx,
        resume_img,
        Some(Cut {
            port: relay_sock.clone(),
            when: Box::new(move || c2.load(Ordering::Relaxed) >= cut_at),
        }),
    )?;
    let _ = relay.join();
    let sent_before_cut = counter.load(Ordering::Relaxed);
    let _ = std::fs::remove_file(&relay_sock);
    if first.code == 0 {
        bail!("(e) the transfer finished before the cut at 50%");
    }
    // The first run's HELLO (the timeline below is the second run's).
    r.wait_for(M_HELLO, Duration::from_secs(30))
        .context("no hello of the cut run")?;
    let before = rss_lines(r);
    let second = nx_send(ctx, resume_img, None)?;
    if second.code != 0 {
        bail!(
            "(e) resumed nx flash send failed (exit {}): {}",
            second.code,
            second.stderr.trim()
        );
    }
    let fd = flashd_rss_after(r, before)?;
    let done = Done::parse(&second.stdout);
    let tl = timeline(r, true, boot0, second.started)?;
    let resent = sent_before_cut.saturating_sub(done.resumed);
    m.resume = Some(report::Resume {
        sent_before_cut,
        resumed_at: done.resumed,
        resent,
        second_wire: done.wire,
        second_time: second.wall,
    });
    m.cases.push(Case {
        key: "e",
        name: "resume after a cut at 50% (second run)".into(),
        bytes: img_len,
        time: second.wall,
        wire: done.wire,
        flashd_kib: fd,
        nx_kib: Some(first.maxrss_kib.max(second.maxrss_kib)),
        note: format!(
            "cut after {} on the wire; target kept {}; re-sent {}; {tl}",
            report::mib(sent_before_cut),
            report::mib(done.resumed),
            report::mib(resent)
        ),
    });
    Ok(m)
}

const M_HELLO: &str = "flashd: hello host=";
fn cpu_line() -> String {
    format!("{}{}", fm::LOG_PREFIX, fm::CPU_TEXT)
}

/// When flashd's markers of one transfer showed up on the console (host clock).
struct Timeline {
    /// nx started → flashd's HELLO marker (connect, image head check, first frame).
    to_hello: Duration,
    hello: Duration,
    received: Option<Duration>,
    verified: Duration,
    installed: Duration,
    install_detail: Option<String>,
    cpu: Option<String>,
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64();
        match self.received {
            Some(rcv) => write!(
                f,
                "nx start → HELLO {:.2} s; guest: HELLO → all received {:.1} s, → verify ok {:.1} s, → installed {:.1} s",
                self.to_hello.as_secs_f64(),
                s(self.hello, rcv),
                s(rcv, self.verified),
                s(self.verified, self.installed)
            )?,
            None => write!(
                f,
                "nx start → HELLO {:.2} s; guest: HELLO → verify ok {:.2} s, → installed {:.2} s",
                self.to_hello.as_secs_f64(),
                s(self.hello, self.verified),
                s(self.verified, self.installed)
            )?,
        }
        if let Some(d) = &self.install_detail {
            write!(f, " ({d})")?;
        }
        if let Some(c) = &self.cpu {
            write!(f, "; flashd {c}")?;
        }
        Ok(())
    }
}

/// flashd's markers of the transfer that just ended, in order (the runner's cursor moves).
fn timeline(
    r: &Runner,
    received: bool,
    boot0: Instant,
    nx_started: Instant,
) -> anyhow::Result<Timeline> {
    let t = Duration::from_secs(30);
    let hello = r.wait_for(M_HELLO, t)?.since_boot;
    let to_hello = (boot0 + hello).saturating_duration_since(nx_started);
    let received = if received {
        Some(r.wait_for("flashd: wrote seg=", t)?.since_boot)
    } else {
        None
    };
    let verified = r.wait_for("flashd: verify ok", t)?.since_boot;
    let install_line = r.wait_for("flashd (log): install: ", t)?.line;
    let installed = r.wait_for("flashd: installed", t)?.since_boot;
    // Newer flashd: where its CPU time went since HELLO (printed before `installed`).
    let cpu = r
        .grep(&cpu_line())
        .last()
        .and_then(|l| l.split(&cpu_line()).nth(1).map(str::to_string));
    let install_detail = install_line
        .rsplit_once(" (")
        .map(|(_, d)| d.trim_end_matches(')').to_string())
        .filter(|d| d.contains(" ms"));
    Ok(Timeline {
        to_hello,
        hello,
        received,
        verified,
        installed,
        install_detail,
        cpu,
    })
}

/// Wait until `text` is anywhere on the console (order does not matter).
fn wait_console(r: &Runner, text: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while !r.console_contains(text) {
        if t.elapsed() > timeout {
            bail!("no {text:?} on the console after {timeout:?}");
        }
        if let Some(o) = r.outcome() {
            bail!("guest stopped ({o}) before {text:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn rss_line() -> String {
    format!("{}{}", fm::LOG_PREFIX, fm::RSS_TEXT)
}

fn rss_lines(r: &Runner) -> usize {
    r.grep(&rss_line()).len()
}

/// flashd's peak RSS line printed after the install that just finished (`None` when this
/// flashd does not print it).
fn flashd_rss_after(r: &Runner, before: usize) -> anyhow::Result<Option<u64>> {
    let t = Instant::now();
    loop {
        let lines = r.grep(&rss_line());
        if lines.len() > before {
            return Ok(lines.last().and_then(|l| {
                l.split(&rss_line())
                    .nth(1)
                    .and_then(|v| v.trim().parse().ok())
            }));
        }
        if t.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "xtask: bench guest: flashd printed no `{}` line (older flashd?)",
                rss_line()
            );
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Raw {
    time: Duration,
    detail: String,
}

/// One rawrecv session: header, the file, the reply. Timed from connect to reply.
fn raw_copy(ctx: &Ctx, img: &Path, mode: &str, hash: &str, sink: &str) -> anyhow::Result<Raw> {
    let len = file_len(img);
    // The digest rawrecv must report (computed before the timed part, once per image).
    let want_digest = match hash {
        "sha256" | "1" | "sha256-par" => {
            let mut cache = ctx.host_digests.borrow_mut();
            if cache.as_ref().map(|d| d.img.as_path()) != Some(img) {
                *cache = Some(HostDigests::of(img)?);
            }
            cache
                .as_ref()
                .and_then(|d| d.want(hash))
                .map(str::to_string)
        }
        _ => None,
    };
    let header = format!("NXRAW1 len={len} mode={mode} hash={hash} sink={sink}\n");
    let mut f = std::fs::File::open(img).with_context(|| format!("open {}", img.display()))?;
    let t = Instant::now();
    let mut s = UnixStream::connect(&ctx.bench_sock)
        .with_context(|| format!("connect {}", ctx.bench_sock.display()))?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.write_all(header.as_bytes())?;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(buf.get(..n).unwrap_or_default())?;
    }
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .context("no reply from rawrecv")?;
    let time = t.elapsed();
    let reply = reply.trim().to_string();
    let Some(fields) = reply.strip_prefix(markers::rawrecv::DONE_PREFIX) else {
        bail!("rawrecv: {reply:?}");
    };
    let get = |k: &str| {
        fields
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("?")
            .to_string()
    };
    if get("bytes") != len.to_string() {
        bail!("rawrecv received {} bytes, sent {len}", get("bytes"));
    }
    if let Some(want) = &want_digest {
        if get("digest") != *want {
            bail!(
                "rawrecv hash={hash}: digest {} but the host computed {want} for {}",
                get("digest"),
                img.display()
            );
        }
    }
    let detail = format!(
        "guest: read {} ms, write {} ms, fsync {} ms{}{}",
        get("read_ms"),
        get("write_ms"),
        get("sync_ms"),
        match hash {
            "0" => String::new(),
            "sha256-par" => format!(
                ", sha256 of 1 MiB pieces {} ms summed over the pool (one thread per vCPU)",
                get("hash_ms")
            ),
            _ => format!(", {hash} {} ms", get("hash_ms")),
        },
        if want_digest.is_some() {
            "; digest checked on the host"
        } else {
            ""
        }
    );
    Ok(Raw { time, detail })
}

/// Kill nx (SIGKILL) once `when` says so, talking through `port` (the counting relay).
struct Cut {
    port: PathBuf,
    when: Box<dyn Fn() -> bool>,
}

struct NxRun {
    started: Instant,
    wall: Duration,
    code: i32,
    maxrss_kib: u64,
    stdout: String,
    stderr: String,
}

/// `nx flash send --json IMG` to the flash port (or through a cut relay); wall time, exit
/// code and peak RSS from `wait4(2)`.
fn nx_send(ctx: &Ctx, img: &Path, cut: Option<Cut>) -> anyhow::Result<NxRun> {
    let port = cut.as_ref().map_or(&ctx.flash_sock, |c| &c.port);
    let t = Instant::now();
    let mut child = Command::new(&ctx.nx)
        .args(["flash", "send", "--json", "--port"])
        .arg(format!("unix:{}", port.display()))
        .args(&ctx.nx_args)
        .arg(img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start nx")?;
    let pid = i32::try_from(child.id()).context("pid")?;
    // nx's own peak: VmHWM of its address space (monotonic), sampled until it exits. Not
    // `ru_maxrss`: a child started with posix_spawn inherits the parent's peak in it.
    let hwm = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (hwm, sampling) = (hwm.clone(), sampling.clone());
        std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| vm_hwm_kib(&t))
                {
                    hwm.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut out_pipe = child.stdout.take().context("nx stdout")?;
    let mut err_pipe = child.stderr.take().context("nx stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    if let Some(c) = &cut {
        while !out_t.is_finished() {
            if (c.when)() {
                // SAFETY: plain kill(2) of our own child, not reaped yet (wait4 below).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Until the child is reaped its /proc entry stays (a zombie has no VmHWM line).
    let _ = out_t_wait(&out_t);
    let mut status = 0i32;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; the child is ours and reaped exactly once (here).
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    if rc != pid {
        bail!("wait4 nx: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(NxRun {
        started: t,
        wall,
        code,
        maxrss_kib: hwm.load(std::sync::atomic::Ordering::Relaxed),
        stdout,
        stderr,
    })
}

/// `VmHWM:   12345 kB` → 12345.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Wait until nx closed its stdout (it is exiting), so the last VmHWM samples are taken.
fn out_t_wait(out_t: &std::thread::JoinHandle<String>) -> bool {
    while !out_t.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// What nx's `done` event says.
#[derive(Debug, Default)]
struct Done {
    wire: u64,
    data: u64,
    zero: u64,
    identical: u64,
    compressed: u64,
    resumed: u64,
    unchanged: bool,
}

impl Done {
    fn parse(stdout: &str) -> Done {
        stdout
            .lines()
            .filter_map(serde_json_lite::parse_done)
            .next_back()
            .unwrap_or_default()
    }

    fn describe(&self) -> String {
        if self.unchanged {
            return format!(
                "unchanged: {} identical, one round trip",
                report::mib(self.identical)
            );
        }
        format!(
            "data {}, zeros skipped {}, identical {}, zstd saved {}",
            report::mib(self.data.saturating_sub(self.identical + self.resumed)),
            report::mib(self.zero),
            report::mib(self.identical),
            report::mib(self.compressed)
        )
    }
}

/// Just enough JSON for nx's `done` event (xtask has no serde_json).
mod serde_json_lite {
    use super::Done;

    fn num(line: &str, key: &str) -> u64 {
        let pat = format!("\"{key}\":");
        line.split(&pat)
            .nth(1)
            .and_then(|rest| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn parse_done(line: &str) -> Option<Done> {
        if !line.contains("\"event\":\"done\"") {
            return None;
        }
        Some(Done {
            wire: num(line, "wire_bytes"),
            data: num(line, "data_bytes"),
            zero: num(line, "zero_bytes"),
            identical: num(line, "identical_bytes"),
            compressed: num(line, "compressed_saved"),
            resumed: num(line, "resumed_bytes"),
            unchanged: line.contains("\"unchanged\":true"),
        })
    }
}

/// A counting relay between nx and QEMU's flash socket, for one connection: bytes from nx
/// are counted (what went on the wire before the cut). Ends when either side closes.
fn relay_start(
    listen: &Path,
    target: &Path,
) -> anyhow::Result<(Arc<AtomicU64>, std::thread::JoinHandle<()>)> {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen).with_context(|| format!("bind {}", listen.display()))?;
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    let target = target.to_path_buf();
    let h = std::thread::spawn(move || {
        let Ok((down, _)) = l.accept() else { return };
        let Ok(up) = UnixStream::connect(&target) else {
            return;
        };
        let (Ok(mut up_r), Ok(mut down_w)) = (up.try_clone(), down.try_clone()) else {
            return;
        };
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_r, &mut down_w);
            let _ = down_w.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 256 * 1024];
        let (mut down_r, mut up_w) = (down, up);
        loop {
            match down_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up_w.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = up_w.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    Ok((counter, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn host_digests_match_what_rawrecv_reports() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let piece = nx_contract::defaults::CHUNK as usize;
        // Two whole pieces and a short one.
        let data: Vec<u8> = (0..2 * piece + 1000)
            .map(|i| (i * 31 + i / 999) as u8)
            .collect();
        std::fs::write(&img, &data).unwrap();
        let d = HostDigests::of(&img).unwrap();
        assert_eq!(
            d.want("sha256"),
            Some(hex::encode(Sha256::digest(&data)).as_str())
        );
        let mut outer = Sha256::new();
        outer.update(Sha256::digest(&data[..piece]));
        outer.update(Sha256::digest(&data[piece..2 * piece]));
        outer.update(Sha256::digest(&data[2 * piece..]));
        assert_eq!(
            d.want("sha256-par"),
            Some(hex::encode(outer.finalize()).as_str())
        );
        assert_eq!(d.want("crc32"), None);
        assert_eq!(d.want("0"), None);
    }
}
