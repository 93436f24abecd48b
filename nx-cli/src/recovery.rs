//! `nx recovery …`: recovery tools on the host.
//!
//! ```text
//! nx recovery diag [--out FILE] [--new] [--json] [--port PORT] [--timeout SECS]
//! ```
//!
//! Fetches the newest diagnostics bundle `STATE/recovery/diag-<n>.tar.zst` (written by
//! `nx-diag`: the recovery shell's `diag`, the recovery menu, the selftest) from the guest
//! through rebootd's `fetchDiag()` on the reboot port (default `unix:build/qemu/reboot.sock`);
//! `--new` asks the guest to write a fresh bundle first. The bundle is checked before it is
//! saved (bounded size, a valid zstd frame with its checksum, a tar of plain `diag/…` files)
//! and written atomically to `--out` (default: `./diag-<n>.tar.zst`).

use crate::reset::RebootPort;
use anyhow::{bail, Context};
use nx_contract::reset_plan::printable as clean;
use nx_engine::rpc_client::{self, Daemon};
use proto::rpc::reboot_capnp::reboot;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Largest bundle accepted from the guest.
pub const MAX_BUNDLE_BYTES: usize = 448 * 1024;
/// Largest decompressed tar accepted.
const MAX_TAR_BYTES: u64 = 1024 * 1024;

/// `nx recovery …`.
#[derive(clap::Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n  \
    nx recovery diag\n  \
    nx recovery diag --new --out /tmp/diag.tar.zst\n  \
    nx recovery diag --json --port unix:/tmp/reboot.sock\n\n",
    crate::exit_table!()
))]
pub struct RecoveryArgs {
    #[command(subcommand)]
    cmd: RecoveryCmd,
}

#[derive(clap::Subcommand, Debug)]
enum RecoveryCmd {
    /// Fetch the newest diagnostics bundle (kernel log, console log, bootctl state, next-boot
    /// record, /state listing, flashd journal) from the guest.
    Diag {
        /// Where to save it (default: ./diag-<n>.tar.zst, the guest's name).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Ask the guest to write a new bundle first.
        #[arg(long)]
        new: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        port: RebootPort,
    },
}

/// A checked bundle: its members (name, size) in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub members: Vec<(String, u64)>,
}

/// The guest's bundle name must be `diag-<1..=9 digits>.tar.zst` (it may become a file name).
pub fn valid_bundle_name(name: &str) -> bool {
    name.strip_prefix("diag-")
        .and_then(|r| r.strip_suffix(".tar.zst"))
        .is_some_and(|d| {
            !d.is_empty()
                && d.len() <= 9
                && !d.starts_with('0')
                && d.bytes().all(|b| b.is_ascii_digit())
        })
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Check a bundle: bounded, a zstd frame (checksum verified) of a ustar archive holding only
/// regular files named `diag/<plain name>`; returns the members.
pub fn check_bundle(data: &[u8]) -> anyhow::Result<Checked> {
    if data.len() > MAX_BUNDLE_BYTES {
        bail!(
            "the bundle is {} bytes, more than the {MAX_BUNDLE_BYTES}-byte bound",
            data.len()
        );
    }
    let dec = zstd::stream::Decoder::new(data).context("the bundle is not zstd")?;
    let mut tar = Vec::new();
    dec.take(MAX_TAR_BYTES + 1)
        .read_to_end(&mut tar)
        .context("the bundle does not decompress (corrupt zstd or checksum mismatch)")?;
    if tar.len() as u64 > MAX_TAR_BYTES {
        bail!("the bundle decompresses to more than {MAX_TAR_BYTES} bytes");
    }
    let mut members = Vec::new();
    let mut off = 0usize;
    loop {
        let Some(h) = tar.get(off..off + 512) else {
            bail!("the tar inside the bundle is cut short");
        };
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored = octal(h.get(148..156).unwrap_or_default())
            .context("a tar header has a bad checksum field")?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            bail!("a tar header's checksum does not match");
        }
        let name_field = h.get(..100).unwrap_or_default();
        let name_len = name_field.iter().position(|&b| b == 0).unwrap_or(100);
        let name = std::str::from_utf8(name_field.get(..name_len).unwrap_or_default())
            .context("a member name is not UTF-8")?;
        let size =
            octal(h.get(124..136).unwrap_or_default()).context("a member has a bad size field")?;
        let typeflag = h.get(156).copied().unwrap_or(0);
        let plain = name
            .strip_prefix(nx_contract::diag::MEMBER_DIR)
            .is_some_and(nx_contract::diag::is_member_name);
        if !plain || !(typeflag == b'0' || typeflag == 0) {
            bail!(
                "the bundle holds an unexpected member {:?}",
                clean(name, 100)
            );
        }
        members.push((name.trim_start_matches("diag/").to_string(), size));
        let padded = size.div_ceil(512) * 512;
        off = off
            .checked_add(512)
            .and_then(|o| o.checked_add(usize::try_from(padded).ok()?))
            .context("a member size overflows")?;
        if off > tar.len() {
            bail!("the tar inside the bundle is cut short");
        }
    }
    if !members.iter().any(|(n, _)| n == "MANIFEST.txt") {
        bail!("the bundle has no MANIFEST.txt");
    }
    Ok(Checked { members })
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    // Mode 0600 as before (the bundle may hold logs of the target).
    let how = nx_guest::fsx::AtomicWrite::new()
        .mode(0o600)
        .follow_dir_symlink();
    nx_guest::fsx::write_atomic_path(path, how, data)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Run `nx recovery …`.
pub fn run(args: RecoveryArgs) -> anyhow::Result<ExitCode> {
    let RecoveryCmd::Diag {
        out,
        new,
        json,
        port,
    } = args.cmd;
    if let Some(p) = &out {
        crate::outpath::check(p, "--out")?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let (name, data) = rt.block_on(rpc_client::with_client(
        &port.port,
        Daemon::Rebootd,
        Duration::from_secs(port.timeout),
        |c: reboot::Client| async move {
            let mut req = c.fetch_diag_request();
            req.get().set_create(new);
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            Ok((r.get_name()?.to_string()?, r.get_data()?.to_vec()))
        },
    ))?;
    if !valid_bundle_name(&name) {
        bail!(
            "the guest named its bundle {:?}, not diag-<n>.tar.zst: refusing to save it",
            clean(&name, 64)
        );
    }
    let checked = check_bundle(&data).context("the guest's diag bundle is not valid; not saved")?;
    let path = out.unwrap_or_else(|| PathBuf::from(&name));
    write_atomic(&path, &data)?;
    let mut stdout = std::io::stdout();
    if json {
        let v = serde_json::json!({
            "bundle": name,
            "saved_to": path.display().to_string(),
            "bytes": data.len(),
            "members": checked.members.iter().map(|(n, s)| serde_json::json!({"name": n, "size": s})).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            stdout,
            "wrote {} ({} bytes, the guest's {name}; {}: {})",
            path.display(),
            data.len(),
            crate::plural(checked.members.len() as u64, "member"),
            checked
                .members
                .iter()
                .map(|(n, s)| format!("{n} ({s})"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_bundle_name("diag-1.tar.zst"));
        assert!(valid_bundle_name("diag-42.tar.zst"));
        assert!(!valid_bundle_name("../diag-1.tar.zst"));
        assert!(!valid_bundle_name("diag-01.tar.zst"));
        assert!(!valid_bundle_name("diag-1.tar.zst/x"));
        assert!(!valid_bundle_name("diag-.tar.zst"));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(check_bundle(b"nope").is_err());
        let z = zstd::bulk::compress(&[0u8; 1024], 3).unwrap();
        assert!(check_bundle(&z)
            .unwrap_err()
            .to_string()
            .contains("MANIFEST"));
        let z = zstd::bulk::compress(&[1u8; 700], 3).unwrap();
        assert!(check_bundle(&z).is_err());
    }
}
