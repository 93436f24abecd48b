//! `nx flash …`: stream an image to flashd (`send`), ask what is installed (`info`), check an
//! image against the install (`verify`), reboot the guest (`reboot`).
//!
//! The transfer, the queries and the fan-out are the host engine ([`nx_engine`]); this module
//! holds the clap arguments, the output ([`render`] implements the engine's
//! [`nx_engine::ProgressSink`]) and the exit codes.
//! User documentation: `docs/tools/nx-flash.md`.

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;
use nx_engine::image_file::{self, ImageFile};
use nx_engine::receipt;
use nx_engine::send::{self, SendError, SendOptions, SendReport};
use nx_engine::transport::PortSpec;
use proto::msg::ErrorCode;
use proto::session::CompressMode;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub mod fanout;
pub mod plan;
pub mod query;
pub mod render;

use render::{human_bytes, rate_mb_s, OutputMode, Renderer};

/// Exit codes of `nx flash …`: the rows of the one table ([`crate::exit::Exit`]) this group
/// uses (documented in `docs/tools/nx.md` and `docs/tools/nx-flash.md`).
pub mod exit {
    use crate::exit::Exit;
    /// Installed (or already installed), info printed, image matches.
    pub const OK: u8 = Exit::Ok.code();
    /// Local error: I/O, bad argument value, cannot write the receipt.
    pub const ERROR: u8 = Exit::Error.code();
    /// Command-line usage error (reported by the argument parser).
    pub const USAGE: u8 = Exit::Usage.code();
    /// The image file is invalid (head, size, a segment hash): nothing was installed.
    pub const IMAGE_INVALID: u8 = Exit::Invalid.code();
    /// The target refused the image's signature or security version: nothing was written.
    pub const TRUST: u8 = Exit::Trust.code();
    /// The target refused the image or its verification/install failed; or `verify` found
    /// another image installed.
    pub const TARGET_REFUSED: u8 = Exit::Refused.code();
    /// Cannot reach the target, the link was lost for good, or it stopped answering. The
    /// transfer is resumable: run the same command again.
    pub const LINK_LOST: u8 = Exit::Unreachable.code();
    /// Interrupted (Ctrl-C). Resumable: run the same command again.
    pub const INTERRUPTED: u8 = Exit::Interrupted.code();
}

/// Arguments of `nx flash`.
#[derive(clap::Args)]
#[command(
    about = "Flash an image to a target over its flash port; query and verify the install",
    after_help = concat!(
        "Examples:\n  \
        nx flash send build/nexus-os.img\n  \
        nx flash send build/nexus-os.img --port unix:/tmp/flash.sock --json\n  \
        nx flash send build/nexus-os.img --port unix:/tmp/a.sock --port unix:/tmp/b.sock\n  \
        nx flash info\n  \
        nx flash verify build/nexus-os.img\n\n",
        crate::exit_table!()
    )
)]
pub struct FlashArgs {
    #[command(subcommand)]
    cmd: FlashCommand,
}

#[derive(clap::Subcommand)]
enum FlashCommand {
    /// Stream an image to flashd: resumable, verified, installed atomically.
    Send(SendArgs),
    /// Ask flashd what is installed and what is staged (INFO?).
    Info(InfoArgs),
    /// Before sending: what the target holds, what would be skipped / patched / compressed /
    /// sent, the bytes on the wire and an ETA from the measured link.
    Plan(plan::PlanArgs),
    /// Check that the target's install is exactly this image (and the file is intact).
    Verify(VerifyArgs),
    /// Reboot the guest into `normal` or `recovery` (asks rebootd).
    Reboot(RebootArgs),
}

/// `nx flash send`.
#[derive(clap::Args)]
#[command(
    after_help = "Ctrl-C leaves the transfer resumable: run the same command again to \
    continue where it stopped. The last line on stdout is the JSON install receipt.\n\n\
    Several --port: the targets are flashed concurrently; a failure on one never stops the \
    others. Lines are prefixed with [TARGET], NDJSON events carry \"target\", stdout ends with \
    one receipt per target (--port order), --receipt FILE gets a JSON array of them, and a \
    per-target summary ends the output. Exit code: 0 if every target succeeded, else the most \
    specific failure: 130 > 3 > 4 > 6 > 5 > 1."
)]
pub struct SendArgs {
    /// The image file (`nx image build` writes one).
    pub image: PathBuf,
    /// Where flashd listens: unix:PATH, a bare path, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD].
    /// Repeat to flash several targets concurrently.
    #[arg(
        long = "port",
        default_value = crate::target::default_port(crate::target::Daemon::Flashd),
        value_name = "PORT",
        action = clap::ArgAction::Append
    )]
    pub ports: Vec<PortSpec>,
    /// WRITE frames in flight (1..=256; default 4). The default keeps 4 MiB in flight with the
    /// default chunk: enough to keep the link busy, and what a resume may have to send again.
    /// The target may lower it to its maximum (a note says so).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub window: Option<u16>,
    /// Chunk size: a power of two from 4K to 1M (e.g. 256K, 1M, 65536; default 1M). Large
    /// chunks cost the target less per byte (fewer frames, writes, ACKs and journal syncs).
    /// Given explicitly it wins over the chunk size of the target's skip index; the default
    /// gives way to it (a note says so).
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk)]
    pub chunk: Option<u32>,
    /// Compression of chunks: auto (zstd where it pays and the link is the bottleneck),
    /// zstd (whenever it shrinks a chunk), none.
    #[arg(
        long,
        default_value = "auto",
        value_parser = clap::builder::PossibleValuesParser::new(["auto", "zstd", "none"])
            .try_map(|s| parse_compress(&s))
    )]
    pub compress: CompressMode,
    /// Send every data chunk, even those the target already holds.
    #[arg(long)]
    pub no_skip: bool,
    /// An image the target may be running (repeatable). When the target offers its
    /// running image as a base and it is one of these, only the changes are sent (zstd
    /// patches against it). Every `*.img` beside IMAGE is a candidate too, unless
    /// --no-base-search.
    #[arg(long, value_name = "IMG")]
    pub base: Vec<std::path::PathBuf>,
    /// Do not look beside IMAGE for base images (only --base).
    #[arg(long)]
    pub no_base_search: bool,
    /// Install even if the image's security version is below the target's anti-rollback
    /// floor. The target honours it only for images signed with one of its development keys
    /// (trust/dev-keys); a release-signed older image is always refused.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// NDJSON events on stdout (start, progress, segment_verified, resumed, done, error,
    /// receipt).
    #[arg(long)]
    pub json: bool,
    /// Also write the install receipt (JSON) to FILE; with several targets a JSON array of
    /// their receipts, in --port order.
    #[arg(long, value_name = "FILE")]
    pub receipt: Option<PathBuf>,
    /// Connections tried in a row without progress before giving up.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub retries: u32,
    /// Retransmission timeout: seconds without an answer before frames are sent again (10
    /// times in a row = link lost). Not a wait for the whole command (`--timeout` of
    /// `nx boot`/`nx reset` is); `--timeout` is still accepted here as an old name.
    #[arg(
        long = "rto",
        alias = "timeout",
        default_value_t = 2.0,
        value_name = "SECS"
    )]
    pub rto: f64,
}

/// `nx flash info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Where flashd listens: unix:PATH, a bare path, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD].
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Flashd), value_name = "PORT")]
    pub port: PortSpec,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nx flash verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The image the target should hold.
    pub image: PathBuf,
    /// Where flashd listens: unix:PATH, a bare path, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD].
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Flashd), value_name = "PORT")]
    pub port: PortSpec,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nx flash reboot`.
#[derive(clap::Args)]
pub struct RebootArgs {
    /// `normal` or `recovery`.
    #[arg(value_parser = ["normal", "recovery"])]
    pub target: String,
    /// Where rebootd listens: unix:PATH, a bare path, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD].
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Rebootd), value_name = "PORT")]
    pub port: String,
}

/// `--chunk SIZE` (also `nx flash plan --chunk`).
pub(crate) fn parse_chunk_arg(s: &str) -> Result<u32, String> {
    parse_chunk(s)
}

fn parse_chunk(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1024u64),
        Some('M' | 'm') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 256K, 1M, 65536)"))?;
    let v = n.saturating_mul(mul);
    let v = u32::try_from(v).map_err(|_| format!("`{s}` is too large (max 1M)"))?;
    if !proto::msg::valid_chunk_size(v) {
        return Err(format!(
            "chunk size {v} must be a power of two from 4K to 1M"
        ));
    }
    Ok(v)
}

fn parse_compress(s: &str) -> Result<CompressMode, String> {
    match s {
        "auto" => Ok(CompressMode::Auto),
        "zstd" => Ok(CompressMode::Zstd),
        "none" => Ok(CompressMode::None),
        _ => Err(format!("`{s}`: use auto, zstd or none")),
    }
}

use nx_engine::host_name;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Run `nx flash …`.
pub fn run(args: FlashArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        FlashCommand::Send(a) => Ok(ExitCode::from(run_send(a)?)),
        FlashCommand::Info(a) => runtime()?.block_on(query::run_info(a)),
        FlashCommand::Plan(a) => plan::run(a),
        FlashCommand::Verify(a) => runtime()?.block_on(query::run_verify(a)),
        FlashCommand::Reboot(a) => {
            let real = runtime()?.block_on(nx_engine::rpc_client::reboot(&a.port, &a.target))?;
            if real {
                eprintln!("nx: the guest is rebooting into {}", a.target);
            } else {
                eprintln!(
                    "nx: rebootd recorded next boot = {} but could only do a stub reboot \
                     (stub/placeholder: the guest's PID 1 does not manage it)",
                    a.target
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `nx flash send`; returns the exit code.
pub fn run_send(a: SendArgs) -> anyhow::Result<u8> {
    let port = match a.ports.as_slice() {
        [] => crate::target::default_port(crate::target::Daemon::Flashd).parse::<PortSpec>()?,
        [one] => one.clone(),
        _ => return fanout::run(a),
    };
    let mode = OutputMode::choose(a.json, !crate::verbosity::notes());
    let mut r = Renderer::new(mode);
    r.set_asked(asked(&a));
    if let Some(p) = &a.receipt {
        if let Err(e) = crate::outpath::check(p, "the receipt") {
            report_error(&r, e.exit.code(), &e.message, None);
            return Ok(e.exit.code());
        }
    }
    let img = match open_image(&a.image) {
        Ok(i) => i,
        Err((code, text)) => {
            report_error(&r, code, &text, None);
            return Ok(code);
        }
    };
    let opts = match send_options(&a, &img) {
        Ok(o) => o,
        Err(e) => {
            report_error(&r, exit::IMAGE_INVALID, &e.to_string(), None);
            return Ok(exit::IMAGE_INVALID);
        }
    };
    let again = again_command(&a.image, std::slice::from_ref(&port));
    let port_name = port.to_string();
    let rt = runtime()?;
    let mut port = port;
    let result = rt.block_on(async {
        let interrupt = send::interrupt_flag();
        send::send_image(img.clone(), &mut port, &opts, &mut r, interrupt).await
    });
    // Do not wait for blocking reads still queued: the process is done.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(rep) => {
            plan::record_rate(&port_name, rep.receipt.wire_bytes, rep.elapsed);
            let receipt_json = serde_json::to_string(&rep.receipt).context("receipt")?;
            if let Some(path) = &a.receipt {
                write_receipt(path, &receipt_json)?;
            }
            say_installed(&r, &rep, img.len());
            if mode == OutputMode::Json {
                r.json(&receipt_event(&rep.receipt)?);
            } else {
                println!("{receipt_json}");
            }
            Ok(exit::OK)
        }
        Err(e) => {
            let (code, hint) = failure(&e, &again);
            report_error(&r, code, &e.to_string(), hint.as_deref());
            Ok(code)
        }
    }
}

/// Open and check the image file's head; on failure the exit code and the message.
fn open_image(path: &std::path::Path) -> Result<Arc<ImageFile>, (u8, String)> {
    ImageFile::open(path).map(Arc::new).map_err(|e| {
        let code = match e {
            image_file::ImageFileError::Invalid { .. } => exit::IMAGE_INVALID,
            _ => exit::ERROR,
        };
        (code, e.to_string())
    })
}

fn send_options(a: &SendArgs, img: &ImageFile) -> Result<SendOptions, nx_engine::delta::BaseError> {
    let mut opts = SendOptions::new(host_name());
    if !a.no_skip {
        opts.bases = nx_engine::delta::Bases::discover(img, &a.base, !a.no_base_search)?;
    }
    let (chunk, window) = chunk_and_window(a);
    opts.window = window;
    opts.chunk_size = chunk;
    opts.exact_chunk = a.chunk.is_some();
    opts.compress = a.compress;
    opts.skip = !a.no_skip;
    opts.allow_downgrade = a.allow_downgrade;
    opts.attempts = a.retries.max(1);
    opts.rto = Duration::from_secs_f64(a.rto.clamp(0.05, 600.0));
    Ok(opts)
}

/// The chunk size and window to offer: the flags, else the defaults.
fn chunk_and_window(a: &SendArgs) -> (u32, u16) {
    (
        a.chunk.unwrap_or(nx_contract::defaults::CHUNK),
        a.window.unwrap_or(nx_contract::defaults::WINDOW),
    )
}

/// What the user asked for, for the renderer's notes.
pub(crate) fn asked(a: &SendArgs) -> render::Asked {
    let (chunk, window) = chunk_and_window(a);
    render::Asked {
        chunk,
        chunk_explicit: a.chunk.is_some(),
        window,
        window_explicit: a.window.is_some(),
    }
}

/// The command that continues a transfer to `ports`.
fn again_command(image: &std::path::Path, ports: &[PortSpec]) -> String {
    let mut cmd = format!("nx flash send {}", image.display());
    for p in ports {
        cmd.push_str(&format!(" --port {p}"));
    }
    cmd
}

/// The summary lines of a successful transfer (stderr, not in JSON/quiet mode).
fn say_installed(r: &Renderer, rep: &SendReport, image_len: u64) {
    let st = rep.outcome.stats;
    let skips = rep.skips;
    r.say(&format!(
        "nx: skipped {} of zeros, {} identical, {} patched (already on the target), {} saved by compression",
        human_bytes(skips.zero),
        human_bytes(skips.identical),
        human_bytes(skips.patched),
        human_bytes(skips.compressed)
    ));
    r.say(&format!(
        "nx: {}: version {} on {} in {:.2} s — {} image at {:.1} MB/s effective, \
         {} of data sent, {} on the wire, {} resent",
        installed_verb(&rep.receipt.state),
        rep.receipt.image_version,
        rep.device,
        rep.elapsed.as_secs_f64(),
        human_bytes(image_len),
        rate_mb_s(image_len, rep.elapsed),
        human_bytes(
            st.data_bytes
                .saturating_sub(st.resumed_bytes + st.identical_bytes)
        ),
        human_bytes(rep.receipt.wire_bytes),
        st.retransmitted_frames
    ));
}

/// `installed`, or `already installed` for a receipt in state `unchanged`.
fn installed_verb(state: &proto::receipt::InstallState) -> &'static str {
    if *state == proto::receipt::InstallState::Unchanged {
        "already installed"
    } else {
        "installed"
    }
}

/// The `receipt` NDJSON event.
fn receipt_event(receipt: &receipt::Receipt) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(receipt).context("receipt")?;
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), "receipt".into());
    }
    Ok(v)
}

/// The exit code of a failed transfer and a hint; `again` continues it.
fn failure(e: &SendError, again: &str) -> (u8, Option<String>) {
    match e {
        SendError::ImageInvalid(_) => (
            exit::IMAGE_INVALID,
            Some(
                "nothing was installed; rebuild the image (`nx image verify` names the bad part)"
                    .to_string(),
            ),
        ),
        SendError::Refused {
            code: ErrorCode::Signature,
            ..
        } => (
            exit::TRUST,
            Some(
                "nothing was written; the device installs only images signed with a key it \
                 trusts: sign with `nx image build --sign KEY` (docs/tools/trust.md)"
                    .to_string(),
            ),
        ),
        SendError::Refused {
            code: ErrorCode::Rollback,
            ..
        } => (
            exit::TRUST,
            Some(
                "nothing was written; build the image with a --security-version at or above \
                 the device's floor (`--allow-downgrade` works only for images signed with a \
                 development key)"
                    .to_string(),
            ),
        ),
        SendError::Refused { .. } => (
            exit::TARGET_REFUSED,
            Some("nothing was installed; the previous install is untouched".to_string()),
        ),
        SendError::Unreachable(_) => (exit::LINK_LOST, None),
        SendError::LinkLost(_) => (
            exit::LINK_LOST,
            Some(format!("the transfer is resumable: run `{again}` again")),
        ),
        SendError::Interrupted => (
            exit::INTERRUPTED,
            Some(format!(
                "the target keeps what it received; continue with the same command: {again}"
            )),
        ),
        SendError::Local(_) => (exit::ERROR, None),
    }
}

fn report_error(r: &Renderer, code: u8, text: &str, hint: Option<&str>) {
    if r.mode() == OutputMode::Json {
        r.json(&serde_json::json!({
            "event": "error", "exit_code": code, "message": text, "hint": hint
        }));
    } else {
        r.error_line(&format!("nx: error: {text}"));
        if let Some(h) = hint {
            r.error_line(&format!("nx: {h}"));
        }
    }
}

fn write_receipt(path: &std::path::Path, json: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write the receipt into {}", dir.display()))?;
    use std::io::Write;
    writeln!(tmp, "{json}").context("cannot write the receipt")?;
    tmp.persist(path)
        .with_context(|| format!("cannot write the receipt {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod default_tests {
    use super::*;

    #[test]
    fn the_chunk_default_is_the_contract_default() {
        assert_eq!(
            // `--chunk`'s help says "default 1M".
            parse_chunk("1M"),
            Ok(nx_contract::defaults::CHUNK)
        );
    }
}
