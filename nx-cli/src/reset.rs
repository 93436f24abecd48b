//! `nx reset factory`: factory reset of the guest's `/state`, through rebootd.
//!
//! ```text
//! nx reset factory --dry-run [--json]   # the exact plan; changes nothing
//! nx reset factory [--yes] [--json]     # double confirmation, then rebootd.factoryWipe()
//!   --port PORT (default unix:build/qemu/reboot.sock), --timeout SECS (default 15)
//! ```
//!
//! The plan is computed in the guest (rebootd `resetPlan()`, the `nx-reset` plan JSON):
//! every path below `/state/apps`, `/state/content`, `/state/settings` that the wipe removes
//! and everything preserved (`/state/trust/**` path by path, boot and slot state, flash,
//! recovery), with sizes. A real reset asks twice — type `yes`, then the device name the
//! guest reports — unless `--yes`, and then asks rebootd (the one reboot authority) to record
//! the wipe request and reboot into recovery, where recovery-init performs the wipe.
//!
//! Nothing from the guest is trusted: the plan is parsed strictly (format 1, exactly the three
//! wiped trees), every shown string is stripped of control characters and bounded.

use anyhow::{bail, Context};
use nx_engine::rpc_client::{self, Daemon};
use proto::rpc::reboot_capnp::reboot;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

/// The trees a factory reset wipes, as the guest shows them.
pub const WIPED: [&str; 3] = ["/state/apps", "/state/content", "/state/settings"];
/// Largest plan JSON accepted from the guest.
const MAX_PLAN_JSON: usize = 384 * 1024;
/// Longest answer line read from the terminal.
const MAX_ANSWER: usize = 256;

/// `nx reset …`.
#[derive(clap::Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n  \
    nx reset factory --dry-run\n  \
    nx reset factory\n  \
    nx reset factory --yes --json --port unix:/tmp/reboot.sock\n\n",
    crate::exit_table!()
))]
pub struct ResetArgs {
    #[command(subcommand)]
    cmd: ResetCmd,
}

/// Where rebootd is.
#[derive(clap::Args, Debug, Clone)]
pub struct RebootPort {
    /// rebootd's port: unix:PATH (or a bare path), tcp:HOST:PORT, serial:DEV[@BAUD].
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Rebootd), value_name = "PORT")]
    pub port: String,
    /// Seconds to wait for rebootd's answer.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub timeout: u64,
}

#[derive(clap::Subcommand, Debug)]
enum ResetCmd {
    /// Wipe /state/apps, /state/content and /state/settings (trust, boot and slot state are
    /// preserved): asks for `yes` and then the device name, unless --yes; then the guest
    /// reboots into recovery, which wipes and boots normal.
    Factory {
        /// Only print the exact plan (every path that would be wiped, everything preserved,
        /// with sizes); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask (scripts, CI).
        #[arg(long, conflicts_with = "dry_run")]
        yes: bool,
        /// Print JSON (the plan with --dry-run, else the result).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        port: RebootPort,
    },
}

// The guest's plan (format 1): one type on both sides of the link, from the contract.
// `clean`: printable text from the guest (control characters become `?`, at most `max`
// characters).
use nx_contract::reset_plan::{printable as clean, Plan};

/// Parse and check the guest's plan: format 1, the wiped trees are exactly
/// [`WIPED`], nothing wiped is also preserved, every wiped entry lies below its tree.
pub fn parse_plan(json: &str) -> anyhow::Result<Plan> {
    if json.len() > MAX_PLAN_JSON {
        bail!(
            "the guest's plan is {} bytes, more than the {MAX_PLAN_JSON}-byte bound",
            json.len()
        );
    }
    let plan: Plan = serde_json::from_str(json)
        .context("the guest sent a factory-reset plan that does not parse")?;
    if plan.format != 1 {
        bail!(
            "the guest's plan has format {}, this nx understands format 1: update nx",
            plan.format
        );
    }
    let wiped: Vec<&str> = plan.wiped.iter().map(|t| t.path.as_str()).collect();
    if wiped != WIPED {
        bail!(
            "the guest's plan wipes {:?}, not exactly {WIPED:?}: refusing (nothing was changed)",
            wiped.iter().map(|p| clean(p, 64)).collect::<Vec<_>>()
        );
    }
    if plan
        .preserved
        .iter()
        .any(|t| WIPED.contains(&t.path.as_str()))
    {
        bail!("the guest's plan lists a wiped tree as preserved: refusing (nothing was changed)");
    }
    if !plan.preserved.iter().any(|t| t.path == "/state/trust") {
        bail!("the guest's plan does not list /state/trust as preserved: refusing (nothing was changed)");
    }
    for t in &plan.wiped {
        let prefix = format!("{}/", t.path);
        if let Some(e) = t.entries.iter().find(|e| !e.path.starts_with(&prefix)) {
            bail!(
                "the guest's plan lists {} under {}: refusing (nothing was changed)",
                clean(&e.path, 128),
                t.path
            );
        }
    }
    Ok(plan)
}

/// The human view of a plan (the same text the recovery console shows).
pub fn render_plan(p: &Plan, with_entries: bool) -> String {
    nx_contract::reset_plan::render(p, with_entries)
}

/// Why a confirmation did not go through.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Cancelled {
    #[error("factory reset cancelled: the answer was {0:?}, not \"yes\"; nothing was changed")]
    NotYes(String),
    #[error("factory reset cancelled: {0:?} is not the device name {1:?}; nothing was changed")]
    WrongName(String, String),
    #[error("factory reset cancelled: no answer (input closed); nothing was changed — use --yes in scripts")]
    NoAnswer,
    #[error("factory reset cancelled: the answer is longer than {MAX_ANSWER} bytes; nothing was changed")]
    TooLong,
}

fn read_answer(input: &mut dyn BufRead) -> Result<String, Cancelled> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *input, MAX_ANSWER as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|_| Cancelled::NoAnswer)?;
    if n == 0 {
        return Err(Cancelled::NoAnswer);
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.len() > MAX_ANSWER {
        return Err(Cancelled::TooLong);
    }
    Ok(text.trim().to_string())
}

/// The double confirmation: `yes`, then the device name. Prompts go to `prompt`.
pub fn confirm(
    device: &str,
    input: &mut dyn BufRead,
    prompt: &mut dyn Write,
) -> Result<(), Cancelled> {
    let _ = write!(
        prompt,
        "This erases everything in {} on device \"{device}\" (trust, boot and slot state are kept).\n\
         Type yes to continue: ",
        WIPED.join(", ")
    );
    let _ = prompt.flush();
    let a = read_answer(input)?;
    if a != "yes" {
        return Err(Cancelled::NotYes(clean(&a, 64)));
    }
    let _ = write!(prompt, "Type the device name ({device}) to confirm: ");
    let _ = prompt.flush();
    let b = read_answer(input)?;
    if b != device {
        return Err(Cancelled::WrongName(clean(&b, 64), device.to_string()));
    }
    Ok(())
}

/// Run `nx reset …`.
pub fn run(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut prompt = std::io::stderr();
    let mut out = std::io::stdout();
    run_with(args, &mut input, &mut prompt, &mut out)
}

/// [`run`] with explicit terminal streams (tests).
pub fn run_with(
    args: ResetArgs,
    input: &mut dyn BufRead,
    prompt: &mut dyn Write,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let ResetCmd::Factory {
        dry_run,
        yes,
        json,
        port,
    } = args.cmd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let (text, device) = rt.block_on(fetch_plan(&port))?;
    let plan = parse_plan(&text)?;
    if !nx_device_name_ok(&device) {
        bail!(
            "the guest reports the device name {:?}, which is not a plain name: refusing (nothing was changed)",
            clean(&device, 64)
        );
    }
    if dry_run {
        if json {
            out.write_all(text.as_bytes())?;
        } else {
            let mut s = format!("device: {device}\n");
            s.push_str(&render_plan(&plan, true));
            s.push_str("dry run: nothing was changed\n");
            out.write_all(s.as_bytes())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !yes {
        let mut s = format!("device: {device}\n");
        s.push_str(&render_plan(&plan, false));
        s.push_str("(every path: nx reset factory --dry-run)\n");
        prompt.write_all(s.as_bytes())?;
        if let Err(c) = confirm(&device, input, prompt) {
            let _ = writeln!(prompt);
            bail!(c);
        }
    }
    let rebooting = rt.block_on(rpc_client::with_client(
        &port.port,
        Daemon::Rebootd,
        Duration::from_secs(port.timeout),
        |c: reboot::Client| async move {
            let resp = c.factory_wipe_request().send().promise.await?;
            Ok(resp.get()?.get_rebooting())
        },
    ))?;
    if json {
        let v = serde_json::json!({
            "device": device,
            "requested": true,
            "rebooting": rebooting,
            "wiped": WIPED,
            "wiped_paths": plan.totals.wiped_paths,
            "wiped_bytes": plan.totals.wiped_bytes,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if rebooting {
        writeln!(
            out,
            "factory reset requested on {device}: the guest reboots into recovery, which wipes {} \
             (console: `nx: reset factory wipe start` … `nx: reset factory wipe done`) and then boots normal",
            WIPED.join(", ")
        )?;
    } else {
        writeln!(
            out,
            "factory reset requested on {device}: rebootd recorded the wipe request, but cannot reboot \
             this guest (stub: rebootd is not managed by the guest's PID 1); the wipe runs at the next \
             boot into recovery"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn nx_device_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn fetch_plan(port: &RebootPort) -> anyhow::Result<(String, String)> {
    rpc_client::with_client(
        &port.port,
        Daemon::Rebootd,
        Duration::from_secs(port.timeout),
        |c: reboot::Client| async move {
            let resp = c.reset_plan_request().send().promise.await?;
            let r = resp.get()?;
            Ok((r.get_json()?.to_string()?, r.get_device()?.to_string()?))
        },
    )
    .await
    .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(input: &str) -> (Result<(), Cancelled>, String) {
        let mut prompt = Vec::new();
        let r = confirm("board-7", &mut input.as_bytes(), &mut prompt);
        (r, String::from_utf8(prompt).unwrap())
    }

    #[test]
    fn double_confirmation() {
        let (r, p) = ask("yes\nboard-7\n");
        assert_eq!(r, Ok(()));
        assert!(p.contains("Type yes to continue: "));
        assert!(p.contains("Type the device name (board-7) to confirm: "));
        assert_eq!(ask("  yes \r\n board-7\r\n").0, Ok(()));
        assert_eq!(ask("y\nboard-7\n").0, Err(Cancelled::NotYes("y".into())));
        assert_eq!(ask("YES\n").0, Err(Cancelled::NotYes("YES".into())));
        assert_eq!(
            ask("yes\nboard-8\n").0,
            Err(Cancelled::WrongName("board-8".into(), "board-7".into()))
        );
        assert_eq!(ask("yes\n").0, Err(Cancelled::NoAnswer));
        assert_eq!(ask("").0, Err(Cancelled::NoAnswer));
        let long = format!("{}\n", "y".repeat(10_000));
        assert_eq!(ask(&long).0, Err(Cancelled::TooLong));
        let (r, _) = ask("yes\x1b[2J\nboard-7\n");
        assert!(matches!(r, Err(Cancelled::NotYes(s)) if s == "yes?[2J"));
    }

    #[test]
    fn hostile_plans_are_refused() {
        let good = r#"{"format":1,"state":"/state","wiped":[
            {"path":"/state/apps","kind":"dir","files":0,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[]},
            {"path":"/state/content","kind":"dir","files":0,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[]},
            {"path":"/state/settings","kind":"dir","files":0,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[]}],
            "preserved":[{"path":"/state/trust","kind":"dir","files":0,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[]}],
            "totals":{"wiped_paths":0,"wiped_bytes":0,"preserved_paths":0,"preserved_bytes":0}}"#;
        assert!(parse_plan(good).is_ok());
        let bad = good.replace("/state/settings\"", "/state/trust\"");
        assert!(parse_plan(&bad)
            .unwrap_err()
            .to_string()
            .contains("refusing"));
        let bad = good.replace(
            r#""path":"/state/apps","kind":"dir","files":0,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[]"#,
            r#""path":"/state/apps","kind":"dir","files":1,"dirs":0,"symlinks":0,"other":0,"bytes":0,"listed":true,"truncated":false,"entries":[{"path":"/state/trust/key","kind":"file","size":1}]"#,
        );
        assert!(parse_plan(&bad)
            .unwrap_err()
            .to_string()
            .contains("/state/trust/key"));
        assert!(parse_plan(&good.replace("\"format\":1", "\"format\":2")).is_err());
        assert!(parse_plan("not json").is_err());
        assert_eq!(clean("a\x1b[31mb\n", 64), "a?[31mb?");
    }
}
