//! `cargo xtask bench [guest|flash|fanout|link]` — benchmarks, not tests: they never fail on a
//! missed target, they say by how much it was missed. Figures are measured every run.
//!
//! * `guest` (the default, issue 7): one QEMU run, the same virtio-serial link into the same
//!   slot partition — raw copy by `rawrecv` (the physical limit) vs `nx flash send` (dense,
//!   10% data, identical re-flash, resume after a cut), boot time, peak RSS; writes
//!   `docs/benchmarks.md` and `docs/benchmarks.svg`. See [`guest`].
//! * `flash` (issue 3): host-run flashd over a unix socket, measured against a raw copy of the
//!   same file through the same kind of socket into the same install path, in one run:
//!   a dense image, an image with 10% data, an immediate re-flash of an identical image, and
//!   the peak RSS of `nx` and `flashd` for a 1 GiB image (best of `--repeat` runs, the machine
//!   is shared).
//! * `rootfs` (issue 14): init's rootfs check + mount with dm-verity vs the whole-segment hash,
//!   normal and padded rootfs. See [`rootfs`].
//! * `fanout` (issue 7): several recovery guests at once (default 4): one guest alone, then one
//!   `nx flash send` with a `--port` per guest; aggregate MB/s vs n × single. See [`fanout`].
//! * `link` (issue 15, 6(b)): goodput vs bit error rate through a fault-injecting relay
//!   ([`relay`]) in front of a host flashd, nx defaults. See [`link`].
//! * `uart` (issue 15 (c)): the guest's UART, raw copy vs `nx flash send`. See [`uart`].

mod boot;
mod delta;
mod fanout;
mod guest;
mod host_flashd;
mod link;
mod relay;
mod report;
mod rootfs;
mod uart;

use crate::util::{cargo, root, run_cmd};
use anyhow::{bail, Context};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Option<Which>,
}

#[derive(clap::Subcommand)]
enum Which {
    /// In a real QEMU guest (the default): raw copy vs nx flash send (dense, 10% data,
    /// identical re-flash, resume after a cut), boot time, peak RSS; writes docs/benchmarks.md.
    Guest(guest::GuestArgs),
    /// Host-run flashd over a unix socket vs a raw copy (dense, 10% data, identical re-flash,
    /// peak RSS for a 1 GiB image).
    Flash(FlashArgs),
    /// Delta updates (issue 15): bytes on the wire for realistic v1 → v2 pairs (a changed
    /// service, a changed kernel, rootfs +10%): ours vs today's skip, casync, zstd
    /// --patch-from, xdelta3, 4 KiB block hashes; writes its block of docs/benchmarks.md.
    Delta(delta::DeltaArgs),
    /// Several QEMU guests at once (default 4): one alone, then all with one nx flash send;
    /// aggregate MB/s vs n × single; writes its block of docs/benchmarks.md.
    Fanout(fanout::FanoutArgs),
    /// Goodput vs bit error rate (issue 15, 6(b)): host flashd behind a fault-injecting relay,
    /// 0 / 1e-6 / 1e-5 / 1e-4 bit flips per byte, nx defaults; writes its block of
    /// docs/benchmarks.md.
    Link(link::LinkArgs),
    /// The guest's UART (issue 15 (c)): raw copy vs nx flash send over serial:/dev/pts/N;
    /// writes its block of docs/benchmarks.md.
    Uart(uart::UartArgs),
    /// Only (g) of the guest benchmark: the boot chain of a fresh device, stage by stage
    /// (firmware, bootloader, kernel, userspace), normal and recovery; prints, writes no docs.
    Boot,
    /// The slot rootfs at boot (issue 14): init's check + mount time with dm-verity vs the
    /// whole-segment hash (`--no-verity`), normal rootfs and one padded with incompressible
    /// data; prints, writes no docs.
    Rootfs,
}

/// `cargo xtask bench flash`.
#[derive(clap::Args)]
pub struct FlashArgs {
    /// Size of the dense and the sparse image, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Size of the image for the peak-RSS measurement, MiB (0 = skip).
    #[arg(long, default_value_t = 1024)]
    rss_mib: u64,
    /// Runs per case; the best is reported (the machine is shared).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Use the release binaries as they are (do not run cargo build).
    #[arg(long)]
    no_build: bool,
    /// Keep the work directory (target/bench-flash).
    #[arg(long)]
    keep: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Some(Which::Guest(a)) => guest::run(a),
        Some(Which::Flash(a)) => flash(a),
        Some(Which::Fanout(a)) => fanout::run(a),
        Some(Which::Delta(a)) => delta::run(a),
        Some(Which::Link(a)) => link::run(a),
        Some(Which::Uart(a)) => uart::run(a),
        Some(Which::Boot) => {
            crate::guest::build(&crate::guest::Args::default())?;
            let chain = boot::measure(&crate::util::build_dir().join("bench/boot"))?;
            for b in &chain {
                println!(
                    "power-on → {} ready: {:.2} s",
                    b.target,
                    b.total().as_secs_f64()
                );
                for l in b.lines() {
                    println!("  {l}");
                }
            }
            Ok(())
        }
        Some(Which::Rootfs) => {
            crate::guest::build(&crate::guest::Args::default())?;
            let cases = rootfs::measure()?;
            println!(
                "| rootfs | rootfs bytes | check | init: open → mounted |\n|---|---:|---|---:|"
            );
            for c in &cases {
                println!(
                    "| {} | {} | {} | {} ms |",
                    c.rootfs, c.rootfs_bytes, c.how, c.mount_ms
                );
            }
            Ok(())
        }
        None => {
            eprintln!(
                "xtask: `cargo xtask bench` = `cargo xtask bench guest` (in QEMU); the host-only \
                 benchmark of issue 3 is `cargo xtask bench flash`"
            );
            guest::run(guest::GuestArgs::default())
        }
    }
}

const MIB: u64 = 1 << 20;

struct Bins {
    nx: PathBuf,
    flashd: PathBuf,
}

fn flash(a: FlashArgs) -> anyhow::Result<()> {
    if !a.no_build {
        run_cmd(cargo().args(["build", "--release", "-p", "nx-cli", "-p", "flashd"]))?;
    }
    let rel = crate::util::host_release_dir();
    let bins = Bins {
        nx: rel.join("nx"),
        flashd: rel.join("flashd"),
    };
    for b in [&bins.nx, &bins.flashd] {
        if !b.exists() {
            bail!("{} is missing: run without --no-build", b.display());
        }
    }
    let dir = root().join("target/bench-flash");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = flash_in(&a, &bins, &dir);
    if !a.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn flash_in(a: &FlashArgs, bins: &Bins, dir: &Path) -> anyhow::Result<()> {
    let size = a.size_mib * MIB;
    let repeat = a.repeat.max(1);
    eprintln!(
        "xtask: bench: making a {} MiB dense and a {} MiB 10%-data image",
        a.size_mib, a.size_mib
    );
    let dense = make_image(bins, dir, "dense", size, 1.0, 1)?;
    let sparse = make_image(bins, dir, "sparse", size, 0.1, 2)?;

    let mut rows: Vec<Row> = Vec::new();
    let mut raw_times = Vec::new();
    let mut flash_times = Vec::new();
    for (name, img) in [("dense", &dense), ("10% data", &sparse)] {
        let raw = best(repeat, || raw_copy(img, dir))?;
        rows.push(Row::new(
            format!("raw copy, {name}"),
            file_len(img),
            raw,
            file_len(img),
            None,
        ));
        let (t, wire, _) = best_flash(repeat, || flash_once(bins, dir, img, false))?;
        rows.push(Row::new(
            format!("nx flash send, {name}"),
            file_len(img),
            t,
            wire,
            Some(raw),
        ));
        raw_times.push(raw);
        flash_times.push(t);
    }
    let (full, refl, wire) = reflash(bins, dir, &sparse, repeat)?;
    rows.push(Row::new(
        "identical re-flash, 10% data".into(),
        file_len(&sparse),
        refl,
        wire,
        None,
    ));

    println!();
    println!(
        "{:<32} {:>9} {:>10} {:>14} {:>10}",
        "case", "time", "MB/s", "wire bytes", "vs raw"
    );
    for r in &rows {
        println!(
            "{:<32} {:>7.3} s {:>10.1} {:>14} {:>10}",
            r.name,
            r.time.as_secs_f64(),
            r.mb_s(),
            r.wire,
            r.ratio.map(|x| format!("{x:.2}×")).unwrap_or_default()
        );
    }
    println!();
    let dense_ratio = raw_times[0].as_secs_f64() / flash_times[0].as_secs_f64();
    let sparse_ratio = raw_times[1].as_secs_f64() / flash_times[1].as_secs_f64();
    let refl_ratio = refl.as_secs_f64() / full.as_secs_f64();
    verdict(
        "dense ≥ 80% of raw",
        dense_ratio >= 0.8,
        format!("{:.0}% of raw", dense_ratio * 100.0),
    );
    verdict(
        "10% data ≥ 5× raw",
        sparse_ratio >= 5.0,
        format!("{sparse_ratio:.2}× raw"),
    );
    verdict(
        "identical re-flash ≤ 10% of a full flash",
        refl_ratio <= 0.10,
        format!(
            "{:.1}% ({:.3} s vs {:.3} s)",
            refl_ratio * 100.0,
            refl.as_secs_f64(),
            full.as_secs_f64()
        ),
    );

    if a.rss_mib > 0 {
        eprintln!(
            "xtask: bench: peak RSS with a {} MiB dense image",
            a.rss_mib
        );
        let big = make_image(bins, dir, "big", a.rss_mib * MIB, 1.0, 3)?;
        let (t, _, rss) = flash_once(bins, dir, &big, true)?;
        let _ = std::fs::remove_file(&big);
        let (nx_kib, fd_kib) = rss.unwrap_or((0, 0));
        println!(
            "peak RSS, {} MiB image ({:.1} s): flashd {:.1} MiB, nx {:.1} MiB",
            a.rss_mib,
            t.as_secs_f64(),
            fd_kib as f64 / 1024.0,
            nx_kib as f64 / 1024.0
        );
        verdict(
            "flashd ≤ 16 MiB",
            fd_kib <= 16 * 1024,
            format!("{:.1} MiB", fd_kib as f64 / 1024.0),
        );
        verdict(
            "nx ≤ 32 MiB",
            nx_kib <= 32 * 1024,
            format!("{:.1} MiB", nx_kib as f64 / 1024.0),
        );
    }
    println!(
        "(host: {} CPUs, load {}; best of {repeat} runs each)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn verdict(what: &str, ok: bool, got: String) {
    println!(
        "target {what}: {} — {got}",
        if ok { "met" } else { "MISSED" }
    );
}

struct Row {
    name: String,
    bytes: u64,
    time: Duration,
    wire: u64,
    ratio: Option<f64>,
}

impl Row {
    fn new(name: String, bytes: u64, time: Duration, wire: u64, raw: Option<Duration>) -> Row {
        Row {
            name,
            bytes,
            time,
            wire,
            ratio: raw.map(|r| r.as_secs_f64() / time.as_secs_f64().max(1e-9)),
        }
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.time.as_secs_f64().max(1e-9)
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn best(n: u32, mut f: impl FnMut() -> anyhow::Result<Duration>) -> anyhow::Result<Duration> {
    let mut b = Duration::MAX;
    for _ in 0..n {
        b = b.min(f()?);
    }
    Ok(b)
}

type FlashRun = (Duration, u64, Option<(u64, u64)>);

fn best_flash(n: u32, mut f: impl FnMut() -> anyhow::Result<FlashRun>) -> anyhow::Result<FlashRun> {
    let mut b: Option<FlashRun> = None;
    for _ in 0..n {
        let r = f()?;
        if b.as_ref().is_none_or(|x| r.0 < x.0) {
            b = Some(r);
        }
    }
    b.context("no run")
}

/// Pseudo-random bytes (xorshift64), fast enough to make a GiB in about a second.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            let b = x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }
}

/// A segment file of `size` bytes where `data` of every 10 MiB is random (1.0 = dense), built
/// into an image with `nx image build`.
fn make_image(
    bins: &Bins,
    dir: &Path,
    name: &str,
    size: u64,
    data: f64,
    seed: u64,
) -> anyhow::Result<PathBuf> {
    let seg = dir.join(format!("{name}.bin"));
    {
        let mut f = std::io::BufWriter::with_capacity(
            4 * MIB as usize,
            File::create(&seg).with_context(|| format!("create {}", seg.display()))?,
        );
        let mut rng = Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut block = vec![0u8; MIB as usize];
        let zero = vec![0u8; MIB as usize];
        let data_every = (1.0 / data).round().max(1.0) as u64;
        for i in 0..size.div_ceil(MIB) {
            let n = (size - i * MIB).min(MIB) as usize;
            if i % data_every == 0 {
                rng.fill(&mut block[..n]);
                f.write_all(&block[..n])?;
            } else {
                f.write_all(&zero[..n])?;
            }
        }
        f.flush()?;
    }
    let img = dir.join(format!("{name}.img"));
    let st = Command::new(&bins.nx)
        .args(["image", "build", "--version", "1", "--no-verity", "--sign"])
        .arg(crate::keys::ensure_dev_key(&crate::util::build_dir())?)
        .arg("--segment")
        .arg(format!("rootfs={}", seg.display()))
        .arg("--out")
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .context("run nx image build")?;
    if !st.success() {
        bail!("nx image build failed for {name}");
    }
    std::fs::remove_file(&seg)?;
    Ok(img)
}

/// A raw copy of `img` through a unix socket into `dir/out.img`: 1 MiB reads and writes,
/// fsync at the end — what a `dd`-style transfer over the same kind of link does.
fn raw_copy(img: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let sock = dir.join("raw.sock");
    let out = dir.join("out.img");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&out);
    let listener = UnixListener::bind(&sock)?;
    let out2 = out.clone();
    let rx = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut f = File::create(&out2)?;
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n])?;
        }
        f.sync_all()?;
        Ok(())
    });
    let t = Instant::now();
    let mut s = UnixStream::connect(&sock)?;
    let mut f = File::open(img)?;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    rx.join()
        .map_err(|_| anyhow::anyhow!("raw receiver panicked"))??;
    let d = t.elapsed();
    if file_len(&out) != file_len(img) {
        bail!("raw copy is incomplete");
    }
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&sock);
    Ok(d)
}

struct Flashd {
    child: Child,
    sock: PathBuf,
}

impl Flashd {
    fn start(bins: &Bins, dir: &Path, fresh: bool) -> anyhow::Result<Flashd> {
        let state = dir.join("state");
        let out = dir.join("out.img");
        if fresh {
            let _ = std::fs::remove_dir_all(&state);
            let _ = std::fs::remove_file(&out);
        }
        std::fs::create_dir_all(&state)?;
        let sock = dir.join("flash.sock");
        let mut child = Command::new(&bins.flashd)
            .arg("--listen")
            .arg(&sock)
            .arg("--state")
            .arg(&state)
            .arg("--install")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start flashd")?;
        let stdout = child.stdout.take().context("flashd stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(l)) if l == "flashd: ready" => {}
            other => bail!("flashd did not start: {other:?}"),
        }
        // Keep draining its markers so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(Flashd { child, sock })
    }

    fn peak_rss_kib(&self) -> u64 {
        vm_hwm(self.child.id())
    }
}

impl Drop for Flashd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Run `nx flash send` once; returns (wall time, wire bytes, peak RSS KiB of nx and flashd).
fn nx_send(bins: &Bins, fd: &Flashd, img: &Path, sample_rss: bool) -> anyhow::Result<FlashRun> {
    let t = Instant::now();
    let mut child = Command::new(&bins.nx)
        .args(["flash", "send"])
        .arg(img)
        .arg("--port")
        .arg(format!("unix:{}", fd.sock.display()))
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start nx")?;
    let mut nx_peak = 0u64;
    if sample_rss {
        // VmHWM only grows: the last sample before exit is the peak so far.
        while child.try_wait()?.is_none() {
            nx_peak = nx_peak.max(vm_hwm(child.id()));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let out = child.wait_with_output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!(
            "nx flash send failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let wire = stdout
        .lines()
        .last()
        .and_then(|l| l.split("\"wire_bytes\":").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let rss = sample_rss.then(|| (nx_peak, fd.peak_rss_kib()));
    Ok((d, wire, rss))
}

fn flash_once(bins: &Bins, dir: &Path, img: &Path, sample_rss: bool) -> anyhow::Result<FlashRun> {
    let fd = Flashd::start(bins, dir, true)?;
    let r = nx_send(bins, &fd, img, sample_rss)?;
    if file_len(&dir.join("out.img")) != file_len(img) {
        bail!("flash did not install the image");
    }
    Ok(r)
}

/// A full flash, then an immediate re-flash of the identical image (best of `n` pairs).
/// Returns (full time, re-flash time, re-flash wire bytes).
fn reflash(
    bins: &Bins,
    dir: &Path,
    img: &Path,
    n: u32,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let mut best: Option<(Duration, Duration, u64)> = None;
    for _ in 0..n {
        let fd = Flashd::start(bins, dir, true)?;
        let (full, _, _) = nx_send(bins, &fd, img, false)?;
        let (again, wire, _) = nx_send(bins, &fd, img, false)?;
        if best.as_ref().is_none_or(|b| {
            again.as_secs_f64() / full.as_secs_f64() < b.1.as_secs_f64() / b.0.as_secs_f64()
        }) {
            best = Some((full, again, wire));
        }
    }
    best.context("no run")
}
