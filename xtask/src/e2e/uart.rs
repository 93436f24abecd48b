//! The UART scenario (issue 15 item 3): recovery's flashd serves the guest's second 16550
//! (`/dev/ttyS1`, on a host pseudo-terminal: `-chardev pty`) beside the virtio-serial port;
//! `nx flash send --port serial:/dev/pts/N build/nexus-os.img` goes through tokio-serial over
//! that lossy line (no flow control: FIFO overruns drop bytes), the install verifies, and
//! `system_b` holds the image byte for byte. The console is checked against `[e2e.uart]`.

use super::flash::verify_installed;
use super::support::{check_console, fail, payload_image, receipt_installed, Ctx, STEP_TIMEOUT};
use anyhow::{ensure, Context};
use nx_contract::{markers, ports};
use nx_qemu::Runner;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Incompressible rootfs payload of the UART image: at ≈ 100 KB/s the whole
/// `build/nexus-os.img` (38 MB, nothing of it skippable on a factory slot) would take minutes.
const PAYLOAD: usize = 256 << 10;

/// Extra `nx flash send` flags (besides `--json --port`): none — nx's defaults must work on
/// a UART (on a `serial:` port it sends frames of at most
/// `nx_contract::defaults::SERIAL_FRAME` bytes and times out by the measured round trip, and
/// only once its frames are out). `NX_E2E_UART_FLAGS` adds flags for measurements.
fn send_flags() -> Vec<String> {
    std::env::var("NX_E2E_UART_FLAGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Scenario `uart`.
pub fn uart(ctx: &Ctx) -> anyhow::Result<()> {
    let image = payload_image("uart", PAYLOAD, 0x5DEE_CE66_D1CE_4E5B)?;
    let mut cfg = ctx.config(true)?;
    // `NX_E2E_UART_SOCKET=1`: QEMU's unix-socket chardev and `--port unix:` instead (the
    // same guest UART; for comparing the two host sides).
    let socket = std::env::var_os("NX_E2E_UART_SOCKET").is_some();
    cfg.uart_pty = !socket;
    let sock = cfg.uart.clone();
    let mut runner = Runner::start(cfg)?;
    ctx.wait_ready(&runner)?;
    runner
        .wait_for(
            markers::recovery::ready(ports::UART.device).as_str(),
            STEP_TIMEOUT,
        )
        .map_err(|e| fail(&runner, &format!("recovery does not serve the UART: {e}")))?;
    // flashd's own line for the link (printed concurrently with recovery's).
    runner
        .wait_for(
            markers::flashd::serving_on(ports::UART.device).as_str(),
            STEP_TIMEOUT,
        )
        .map_err(|e| fail(&runner, &format!("flashd does not serve the UART: {e}")))?;
    let port = match (socket, sock) {
        (true, Some(sock)) => format!("unix:{}", sock.display()),
        _ => {
            let pty = runner.uart_pty().context(
                "QEMU did not say which pseudo-terminal the UART is on (`char device redirected to … (label uart1)`)",
            )?;
            format!("serial:{}", pty.display())
        }
    };
    eprintln!(
        "xtask: e2e uart: nx flash send --port {port} {}",
        send_flags().join(" ")
    );
    let t = Instant::now();
    let lines = ctx.send_over(&runner, &port, &send_flags(), &image)?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    eprintln!(
        "xtask: e2e uart: installed over {port} in {secs:.1} s ({}; corrupt frames seen by \
         flashd: {}); receipt: {}",
        retransmits(&lines),
        runner.grep("link: skipped").len(),
        lines.last().map(String::as_str).unwrap_or_default()
    );
    ctx.check_flash_markers(&runner, &ctx.contract.flash.resume_markers)?;
    runner.stop();
    check_console(ctx, &runner)?;
    verify_installed(&ctx.dir.join("disk.img"), &image)
}

/// nx's retransmissions by reason (`"event":"retransmit"` lines of `--json`).
fn retransmits(lines: &[String]) -> String {
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for l in lines
        .iter()
        .filter(|l| l.contains("\"event\":\"retransmit\""))
    {
        let reason = l
            .split("\"reason\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        *by.entry(reason.to_string()).or_default() += 1;
    }
    if by.is_empty() {
        return "no retransmission".into();
    }
    let parts: Vec<String> = by.iter().map(|(r, n)| format!("{n}× {r}")).collect();
    format!("retransmissions: {}", parts.join(", "))
}

/// What `cargo xtask bench uart` measured on one recovery guest, over one UART.
#[derive(Debug, Clone)]
pub struct UartBench {
    /// Raw copy: bytes of one frame the host wrote (an identification probe carrying junk).
    pub raw_bytes: u64,
    /// From the first byte written to flashd's answer, which needs every byte intact (CRC).
    pub raw_secs: f64,
    /// The image `nx flash send` installed: file size, bytes on the wire (receipt), time.
    pub image_bytes: u64,
    pub wire_bytes: u64,
    pub nx_secs: f64,
    /// The data phase alone, from nx's own events as they were printed: the `start` event
    /// (HELLO answered) to the progress event that reports every byte acknowledged; the
    /// bytes on the wire by then. Without it, the command's fixed costs (QEMU notices a
    /// newly opened pseudo-terminal within a second, HELLO, DONE, install) hide the rate.
    pub data_secs: Option<f64>,
    pub data_wire: u64,
    /// Frames flashd dropped as corrupt during the whole run (`link: skipped` lines).
    pub corrupt_events: usize,
}

/// Boot recovery with the UART on a pseudo-terminal; time a raw copy of `raw_len` bytes and
/// then `nx flash send` (defaults) of an image with `payload` bytes of incompressible data.
pub fn bench(raw_len: usize, payload: usize, nx: &std::path::Path) -> anyhow::Result<UartBench> {
    let image = payload_image("uart-bench", payload, 0x2545_F491_4F6C_DD1D)?;
    let ctx = Ctx::new("bench-uart", false)?;
    let mut cfg = ctx.config(true)?;
    cfg.uart_pty = true;
    let mut runner = Runner::start(cfg)?;
    ctx.wait_ready(&runner)?;
    runner.wait_for(
        markers::flashd::serving_on(ports::UART.device).as_str(),
        STEP_TIMEOUT,
    )?;
    let pty = runner
        .uart_pty()
        .context("QEMU did not say which pseudo-terminal the UART is on")?;
    let raw_secs = raw_copy(&pty, raw_len)
        .map_err(|e| fail(&runner, &format!("raw copy over {}: {e:#}", pty.display())))?;
    eprintln!(
        "xtask: bench uart: raw copy of {raw_len} bytes in {raw_secs:.2} s ({:.1} kB/s)",
        raw_len as f64 / raw_secs.max(1e-9) / 1000.0
    );
    let port = format!("serial:{}", pty.display());
    let t = Instant::now();
    let mut child = Command::new(nx)
        .args(["flash", "send", "--json", "--port", &port])
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("could not run nx")?;
    // Each line of nx's NDJSON with the moment it was printed.
    let mut lines: Vec<(Instant, String)> = Vec::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            lines.push((Instant::now(), line.context("reading nx's output")?));
        }
    }
    let status = child.wait().context("waiting for nx")?;
    let nx_secs = t.elapsed().as_secs_f64();
    let (data_secs, data_wire) = data_phase(&lines);
    let stdout = lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let receipt = stdout.lines().last().unwrap_or_default().to_string();
    ensure!(
        status.success() && receipt.contains("\"state\":\"installed\""),
        "nx flash send over {port} failed ({}): {}",
        status,
        stdout
            .lines()
            .filter(|l| !l.contains("\"progress\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let corrupt_events = runner.grep("link: skipped").len();
    runner.stop();
    Ok(UartBench {
        raw_bytes: raw_len as u64,
        raw_secs,
        image_bytes: std::fs::metadata(&image)?.len(),
        wire_bytes: super::support::json_u64(&receipt, "wire_bytes").unwrap_or(0),
        nx_secs,
        data_secs,
        data_wire,
        corrupt_events,
    })
}

/// The data phase in nx's timestamped NDJSON lines: from the `start` event to the first
/// progress event with every data byte acknowledged, and the bytes on the wire by then.
fn data_phase(lines: &[(Instant, String)]) -> (Option<f64>, u64) {
    use super::support::json_u64;
    let start = lines
        .iter()
        .find(|(_, l)| l.contains("\"event\":\"start\""))
        .map(|(t, _)| *t);
    let end = lines.iter().find(|(_, l)| {
        l.contains("\"event\":\"progress\"")
            && json_u64(l, "done_bytes").is_some()
            && json_u64(l, "done_bytes") == json_u64(l, "total_bytes")
    });
    match (start, end) {
        (Some(s), Some((e, l))) if *e > s => (
            Some(e.duration_since(s).as_secs_f64()),
            json_u64(l, "wire_bytes").unwrap_or(0),
        ),
        _ => (None, 0),
    }
}

/// Write one identification probe whose payload is `len` bytes of junk to the UART's
/// pseudo-terminal and wait for flashd's answer: flashd answers only once the whole frame
/// arrived with a good CRC. A small probe first waits out QEMU noticing the terminal
/// (it polls a pseudo-terminal once a second).
fn raw_copy(pty: &std::path::Path, len: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(pty)
        .with_context(|| format!("open {}", pty.display()))?;
    // SAFETY: plain termios calls on a descriptor we own; `t` is filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        ensure!(libc::tcgetattr(f.as_raw_fd(), &mut t) == 0, "tcgetattr");
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CLOCAL | libc::CREAD;
        ensure!(
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) == 0,
            "tcsetattr"
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = f.try_clone()?;
    // The reader must be gone before nx opens the terminal (it would take nx's bytes).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        use std::io::Read;
        let mut dec = proto::frame::FrameDecoder::new();
        let mut buf = bytes::BytesMut::new();
        let mut b = [0u8; 4096];
        loop {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: reader.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(fr)) => {
                        if fr.msg_type() == proto::ident::REPLY && tx.send(Instant::now()).is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            match reader.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
    });
    let wait = std::time::Duration::from_secs(10);
    for _ in 0..5 {
        f.write_all(&proto::ident::probe())?;
        if rx.recv_timeout(wait).is_ok() {
            break;
        }
    }
    let junk = crate::guest::junk(len, 0x9E37_79B9_7F4A_7C15);
    let frame =
        proto::frame::Frame::new(proto::ident::PROBE, 0, 0, bytes::Bytes::from(junk))?.to_bytes();
    let t = Instant::now();
    f.write_all(&frame)?;
    let done = rx.recv_timeout(std::time::Duration::from_secs(600));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = handle.join();
    let done =
        done.context("no answer to the raw probe: bytes were lost on the line (its CRC failed)")?;
    Ok(done.duration_since(t).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::data_phase;
    use std::time::{Duration, Instant};

    #[test]
    fn the_data_phase_runs_from_start_to_the_first_complete_progress() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let lines = vec![
            (at(0), r#"{"event":"connecting"}"#.to_string()),
            (at(900), r#"{"event":"start","chunks":2}"#.to_string()),
            (
                at(1500),
                r#"{"done_bytes":10,"event":"progress","total_bytes":20,"wire_bytes":11}"#
                    .to_string(),
            ),
            (
                at(2900),
                r#"{"done_bytes":20,"event":"progress","total_bytes":20,"wire_bytes":23}"#
                    .to_string(),
            ),
            (
                at(3000),
                r#"{"done_bytes":20,"event":"progress","total_bytes":20,"wire_bytes":25}"#
                    .to_string(),
            ),
            (at(3500), r#"{"event":"receipt"}"#.to_string()),
        ];
        let (secs, wire) = data_phase(&lines);
        assert!((secs.unwrap() - 2.0).abs() < 1e-6);
        assert_eq!(wire, 23);
        assert_eq!(data_phase(&lines[..3]), (None, 0), "never complete");
    }
}
