//! `nx image …`: build, verify, inspect images and make signing keys.
//!
//! The format itself (header, canonical manifest, layout rules) lives in the sans-IO
//! [`proto::image`] and [`proto::manifest`] modules; this module does the file I/O around them.
//! User documentation: `docs/tools/nx-image.md`.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

/// `println!` that ignores a closed stdout (e.g. `nx image inspect | head -1`) instead of
/// panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod build;
pub mod inspect;
pub mod keygen;
pub mod rootfs;
pub mod verify;

/// Exit codes of `nx image …`: the rows of the one table ([`crate::exit::Exit`]) this group
/// uses (documented in `docs/tools/nx.md` and `docs/tools/nx-image.md`).
pub mod exit {
    use crate::exit::Exit;
    /// Success.
    pub const OK: u8 = Exit::Ok.code();
    /// I/O error, unreadable key, bad argument value, build failure.
    pub const ERROR: u8 = Exit::Error.code();
    /// Command-line usage error (reported by the argument parser).
    pub const USAGE: u8 = Exit::Usage.code();
    /// The image is malformed (or of an older format), truncated, or a hash (sha256 or
    /// data_sha256), padding or data-range check failed.
    pub const VERIFY_FAILED: u8 = Exit::Invalid.code();
    /// A signature was required (`--pub`) and is missing, invalid or made with another key.
    pub const SIGNATURE_FAILED: u8 = Exit::Trust.code();
}

/// Arguments of `nx image`.
#[derive(clap::Args)]
#[command(
    about = "Build, verify and inspect OS images; make signing keys",
    long_about = "Build, verify and inspect nexus OS images, and make Ed25519 signing keys.\n\n\
        An image is a 4 KiB header, a canonical JSON manifest (with an optional Ed25519 \
        signature), then the segments (rootfs, kernel, ...), each 4 KiB aligned. \
        See docs/provisioning/overview.md for the byte layout.",
    after_help = concat!(
        "Examples:\n  \
        nx image keygen --out keys/release\n  \
        nx image build --rootfs rootfs/ --version 1 --out build/nexus-os.img --sign keys/release\n  \
        nx image verify build/nexus-os.img --pub keys/release.pub\n  \
        nx image inspect build/nexus-os.img --json\n\n",
        crate::exit_table!()
    )
)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCommand,
}

#[derive(clap::Subcommand)]
enum ImageCommand {
    /// Build an image from a rootfs directory and raw segment files.
    Build(build::BuildArgs),
    /// Recompute every hash of an image and check its signature.
    Verify(verify::VerifyArgs),
    /// Show what an image holds (version, segments, sizes, hashes, data ratio, signed or not).
    Inspect(inspect::InspectArgs),
    /// Make an Ed25519 signing key pair (KEY and KEY.pub).
    Keygen(keygen::KeygenArgs),
}

/// Run `nx image …`.
pub fn run(args: ImageArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        ImageCommand::Build(a) => build::run(a),
        ImageCommand::Verify(a) => verify::run(a),
        ImageCommand::Inspect(a) => inspect::run(a),
        ImageCommand::Keygen(a) => keygen::run(a),
    }
}

/// Read a small text file (a key), refusing anything longer than `max` bytes.
pub(crate) fn read_small_text(path: &Path, max: u64, what: &str) -> anyhow::Result<String> {
    let f = File::open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let mut s = String::new();
    f.take(max + 1).read_to_string(&mut s).with_context(|| {
        format!(
            "cannot read {what} {} (is it a text key file?)",
            path.display()
        )
    })?;
    if s.len() as u64 > max {
        anyhow::bail!(
            "{what} {} is larger than {max} bytes: not a key file",
            path.display()
        );
    }
    Ok(s)
}

/// Fill `buf` from `r` until it is full or the reader is at EOF; returns the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Read buffer size for streaming segment data.
pub(crate) const CHUNK: usize = 1 << 20;

/// `part / whole` as a percentage with one decimal, `100.0` for an empty whole.
pub(crate) fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 100.0;
    }
    (part as f64 * 1000.0 / whole as f64).round() / 10.0
}

/// Human-readable byte count (binary units), e.g. `12.3 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
