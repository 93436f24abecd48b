//! The fan-out scenario of issue 7 on two real QEMU guests at once (`fanout`): two recovery
//! guests, each with its own disks and sockets under `build/e2e/fanout/{a,b}/`, are flashed
//! by **one** `nx flash send build/nexus-os-v2.img --port unix:<a>/flash.sock --port
//! unix:<b>/flash.sock --receipt build/e2e/fanout/receipts.json`, which must exit 0.
//!
//! Then, per guest: flashd's markers in order (`flashd: hello`, `wrote seg=rootfs`, `verify
//! ok`, `installed`), the activation of slot b on trial and the automatic reboot into it
//! (`init: booted slot=b version=2 trial=true`); after the run the whole console is checked
//! against `[e2e.fanout]` of qemu/markers.toml.
//!
//! The receipts verify: `receipts.json` is a JSON array of two entries in `--port` order,
//! equal to the two receipt lines nx printed, each `state == "installed"` for its own target,
//! with the image fields (`image_version`, `image_id`, `image_sha256`, `image_size`) of the
//! image's manifest (`nx image inspect --json`) and equal to what that guest's flashd recorded
//! in `/state/flash/last-install.json` (read offline from a journal-replayed copy of its
//! state.img once both QEMUs are stopped).
//!
//! Both QEMUs are always killed (the runners stop on drop); a failure carries the console
//! tails of both guests.

use super::support::{built_image, check_console, replayed_state_copy, Ctx, STEP_TIMEOUT};
use crate::util;
use anyhow::{ensure, Context};
use nx_contract::markers;
use nx_qemu::Runner;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The guests, by sub-directory of `build/e2e/fanout/`.
const GUESTS: [&str; 2] = ["a", "b"];
/// The image fields a receipt shares with flashd's record and the manifest.
const IMAGE_FIELDS: [&str; 4] = ["image_version", "image_id", "image_sha256", "image_size"];
/// What each console must show after the transfer, in order (waited for live).
fn after_send() -> Vec<String> {
    [
        "flashd: hello",
        "flashd: wrote seg=rootfs",
        "flashd: verify ok",
        "flashd: installed",
        "bootctl: slotImaged slot=b version=2",
        "bootctl: setActive slot=b trial=true tries=3",
        markers::init::booted("b", "2", true).as_str(),
        markers::init::ready().as_str(),
    ]
    .iter()
    .map(|m| m.to_string())
    .collect()
}

/// Scenario `fanout`.
pub fn fanout(ctx: &Ctx) -> anyhow::Result<()> {
    let image = built_image("nexus-os-v2.img")?;
    let guests = GUESTS
        .iter()
        .map(|g| Ctx::at(&ctx.name, &ctx.dir.join(g), ctx.echo))
        .collect::<anyhow::Result<Vec<Ctx>>>()?;
    let t0 = Instant::now();
    let mut runners = Vec::new();
    for g in &guests {
        runners.push(g.boot(true)?);
    }
    let result = run(ctx, &guests, &runners, &image);
    for r in &mut runners {
        r.stop();
    }
    let result = result.and_then(|receipts| {
        for (g, r) in guests.iter().zip(&runners) {
            check_console(g, r)?;
        }
        for (i, (g, receipt)) in guests.iter().zip(&receipts).enumerate() {
            check_record(g, GUESTS[i], receipt)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            eprintln!(
                "xtask: e2e: fanout: 2 guests flashed by one nx flash send, both receipts verify ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => Err(with_tails(e, &runners)),
    }
}

/// Both guests ready → one `nx flash send` with two `--port` → markers on both consoles.
/// Returns the receipts of the file, in `--port` order.
fn run(ctx: &Ctx, guests: &[Ctx], runners: &[Runner], image: &Path) -> anyhow::Result<Vec<Value>> {
    for (i, r) in runners.iter().enumerate() {
        r.wait_for(
            markers::recovery::ready("/dev/vport0p1").as_str(),
            STEP_TIMEOUT,
        )
        .with_context(|| format!("guest {} did not become ready", GUESTS[i]))?;
    }
    let ports = guests
        .iter()
        .zip(runners)
        .map(|(g, r)| g.port(r, nx_contract::ports::FLASH.name))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let receipt_file = ctx.dir.join("receipts.json");
    let _ = std::fs::remove_file(&receipt_file);
    let mut cmd = Command::new(&ctx.nx);
    cmd.args(["flash", "send"]).arg(image);
    for p in &ports {
        cmd.args(["--port", p]);
    }
    cmd.arg("--receipt").arg(&receipt_file);
    let t = Instant::now();
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .context("could not run nx")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "nx flash send with two --port failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!(
        "xtask: e2e: fanout: nx flash send {} --port {} exited 0 in {:.2} s",
        image.display(),
        ports.join(" --port "),
        t.elapsed().as_secs_f64()
    );
    for l in stderr
        .lines()
        .filter(|l| l.contains("nx: summary") || l.contains("nx: target"))
    {
        eprintln!("  {l}");
    }
    for (i, r) in runners.iter().enumerate() {
        for m in after_send() {
            r.wait_for(&m, STEP_TIMEOUT)
                .with_context(|| format!("guest {}: missing marker: {m}", GUESTS[i]))?;
        }
    }
    check_receipts(ctx, image, &ports, &stdout, &receipt_file)
}

/// The receipt file: two entries in `--port` order, equal to nx's last two stdout lines,
/// installed, with the manifest's image fields.
fn check_receipts(
    ctx: &Ctx,
    image: &Path,
    ports: &[String],
    stdout: &str,
    file: &Path,
) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON:\n{text}", file.display()))?;
    let receipts = v
        .as_array()
        .with_context(|| format!("{} is not a JSON array:\n{text}", file.display()))?
        .clone();
    ensure!(
        receipts.len() == ports.len(),
        "{} holds {} receipts, not {}",
        file.display(),
        receipts.len(),
        ports.len()
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() >= ports.len(),
        "nx printed {} lines on stdout, fewer than one receipt per target:\n{stdout}",
        lines.len()
    );
    let printed = &lines[lines.len() - ports.len()..];
    let inspect = util::capture(
        Command::new(&ctx.nx)
            .args(["image", "inspect", "--json"])
            .arg(image),
    )?;
    let manifest: Value = serde_json::from_str(&inspect)
        .with_context(|| format!("nx image inspect --json is not JSON:\n{inspect}"))?;
    let want = [
        ("image_version", manifest["version"].clone()),
        ("image_id", manifest["manifest_id"].clone()),
        ("image_sha256", manifest["image_sha256"].clone()),
        ("image_size", manifest["total_size"].clone()),
    ];
    for (i, (r, port)) in receipts.iter().zip(ports).enumerate() {
        let g = GUESTS[i];
        let line: Value = serde_json::from_str(printed[i])
            .with_context(|| format!("nx's receipt line {i} is not JSON: {}", printed[i]))?;
        ensure!(
            &line == r,
            "guest {g}: the receipt nx printed differs from the one in {}:\n{line}\n{r}",
            file.display()
        );
        ensure!(
            r["state"] == "installed",
            "guest {g}: receipt state is {} (want installed): {r}",
            r["state"]
        );
        ensure!(
            r["target"] == port.as_str(),
            "guest {g}: receipt {i} names target {} (want {port}, --port order)",
            r["target"]
        );
        for (k, w) in &want {
            ensure!(
                !w.is_null() && &r[*k] == w,
                "guest {g}: receipt {k} = {} but the manifest says {w}",
                r[*k]
            );
        }
    }
    eprintln!(
        "xtask: e2e: fanout: {} holds 2 receipts (= nx's stdout), both installed, image_sha256 {} = the manifest's",
        file.display(),
        manifest["image_sha256"].as_str().unwrap_or("?")
    );
    Ok(receipts)
}

/// flashd's own record in the guest's state.img (offline, journal replayed) has the same
/// image fields as nx's receipt for that guest, `state: installed`, `writer: flashd`.
fn check_record(g: &Ctx, name: &str, receipt: &Value) -> anyhow::Result<()> {
    let (tmp, img) = replayed_state_copy(g)?;
    let out = tmp.path().join("last-install.json");
    util::run_cmd(
        Command::new(util::tool("debugfs")?)
            .arg("-R")
            .arg(format!("dump /flash/last-install.json {}", out.display()))
            .arg(&img)
            .stderr(Stdio::null()),
    )?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    ensure!(
        !text.trim().is_empty(),
        "guest {name}: /state/flash/last-install.json is missing from {} after the run",
        g.dir.join("state.img").display()
    );
    let rec: Value = serde_json::from_str(&text)
        .with_context(|| format!("guest {name}: last-install.json is not JSON:\n{text}"))?;
    ensure!(
        rec["state"] == "installed" && rec["writer"] == "flashd",
        "guest {name}: flashd's record is not an installed flashd record: {rec}"
    );
    for k in IMAGE_FIELDS {
        ensure!(
            rec[k] == receipt[k],
            "guest {name}: {k}: nx's receipt says {} but flashd's last-install.json says {}",
            receipt[k],
            rec[k]
        );
    }
    eprintln!(
        "xtask: e2e: fanout: guest {name}: flashd's /state/flash/last-install.json = nx's receipt ({})",
        IMAGE_FIELDS.join(", ")
    );
    Ok(())
}

/// The error plus the last console lines of every guest.
fn with_tails(e: anyhow::Error, runners: &[Runner]) -> anyhow::Error {
    let mut msg = format!("{e:#}");
    for (i, r) in runners.iter().enumerate() {
        let tail = r.tail(nx_qemu::markers::TAIL_LINES).join("\n");
        msg.push_str(&format!(
            "\n--- guest {}: last console lines ({}) ---\n{tail}\n--- end of console ---",
            GUESTS[i],
            r.config().console_log().display()
        ));
    }
    anyhow::anyhow!(msg)
}
