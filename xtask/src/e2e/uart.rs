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

/// Extra `nx flash send` flags (besides `--json --port`): none — the defaults must get
/// through the line. `NX_E2E_UART_FLAGS="--chunk 4K"` tries others (measurements).
fn send_flags() -> Vec<String> {
    std::env::var("NX_E2E_UART_FLAGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Scenario `uart`.
pub fn uart(ctx: &Ctx) -> anyhow::Result<()> {
    let image = payload_image("uart", PAYLOAD, 0x5DEE_CE66_D1CE_4E5B)?;
    let mut cfg = ctx.config(true)?;
    cfg.uart_pty = true;
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
    let pty = runner
        .uart_pty()
        .context("QEMU did not say which pseudo-terminal the UART is on (`char device redirected to … (label uart1)`)")?;
    let port = format!("serial:{}", pty.display());
    eprintln!(
        "xtask: e2e uart: nx flash send --port {port} {}",
        send_flags().join(" ")
    );
    let t = Instant::now();
    let out = Command::new(&ctx.nx)
        .args(["flash", "send", "--json", "--port", &port])
        .args(send_flags())
        .arg(&image)
        .stderr(Stdio::inherit())
        .output()
        .context("could not run nx")?;
    let secs = t.elapsed().as_secs_f64();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        return Err(fail(
            &runner,
            &format!(
                "nx flash send over the UART failed ({}): {}",
                out.status,
                lines.join("\n")
            ),
        ));
    }
    ensure!(
        receipt_installed(&lines),
        "no installed receipt from nx: {lines:?}"
    );
    eprintln!(
        "xtask: e2e uart: installed over {port} in {secs:.1} s; receipt: {}",
        lines.last().map(String::as_str).unwrap_or_default()
    );
    ctx.check_flash_markers(&runner, &ctx.contract.flash.resume_markers)?;
    runner.stop();
    check_console(ctx, &runner)?;
    verify_installed(&ctx.dir.join("disk.img"), &image)
}
