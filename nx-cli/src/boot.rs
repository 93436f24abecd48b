//! `nx boot …`: the A/B slot table, through bootctld (Cap'n Proto RPC).
//!
//! ```text
//! nx boot status [--json]
//! nx boot set-active <a|b> [--trial [--tries N]]
//! nx boot confirm
//! nx boot mark-bad <a|b>
//! nx boot reboot
//! ```
//! Every verb takes `--port PORT` (default: bootctld's port of [`crate::target`]) and
//! `--timeout SECS`. bootctld is the only authority: `nx` never edits the slot
//! table itself, it asks and prints the answer (or bootctld's refusal).

use anyhow::Context;
use nx_engine::rpc_client::{self, Daemon};
use proto::rpc::bootctl_capnp::{self as bc, boot_ctl};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// `nx boot …`.
#[derive(clap::Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n  \
    nx boot status\n  \
    nx boot set-active b --trial --tries 3\n  \
    nx boot reboot\n  \
    nx boot confirm\n  \
    nx boot status --json --port unix:/tmp/bootctl.sock\n\n",
    crate::exit_table!()
))]
pub struct BootArgs {
    #[command(subcommand)]
    cmd: BootCmd,
}

/// Where bootctld is.
#[derive(clap::Args, Debug, Clone)]
pub struct PortArgs {
    /// bootctld's port: unix:PATH (or a bare path), tcp:HOST:PORT, serial:DEV[@BAUD].
    #[arg(long, default_value = crate::target::default_port(crate::target::Daemon::Bootctld), value_name = "PORT")]
    port: String,
    /// Seconds to wait for bootctld's answer.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    timeout: u64,
}

/// A slot name on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotArg {
    /// Slot a (partition system_a).
    A,
    /// Slot b (partition system_b).
    B,
}

impl SlotArg {
    fn wire(self) -> bc::Slot {
        match self {
            SlotArg::A => bc::Slot::A,
            SlotArg::B => bc::Slot::B,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SlotArg::A => "a",
            SlotArg::B => "b",
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum BootCmd {
    /// Show the slot table (active slot, health, trial, tries, version).
    Status {
        /// Print bootctld's JSON view instead of the table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        port: PortArgs,
    },
    /// Make a slot the one the next normal boot uses (optionally as a trial).
    SetActive {
        /// The slot.
        #[arg(value_enum)]
        slot: SlotArg,
        /// Boot it on trial: each boot spends one try; when they run out it is
        /// marked bad and the other slot boots.
        #[arg(long)]
        trial: bool,
        /// Trial tries (1..=15).
        #[arg(long, requires = "trial", default_value_t = 3)]
        tries: u8,
        #[command(flatten)]
        port: PortArgs,
    },
    /// Mark the slot booted in this boot good and end its trial.
    Confirm {
        #[command(flatten)]
        port: PortArgs,
    },
    /// Reboot the guest into the normal boot of the active slot (bootctld asks rebootd).
    Reboot {
        #[command(flatten)]
        port: PortArgs,
    },
    /// Mark a slot bad (sticky until it is re-imaged).
    MarkBad {
        /// The slot.
        #[arg(value_enum)]
        slot: SlotArg,
        #[command(flatten)]
        port: PortArgs,
    },
}

/// Run `nx boot …`.
pub fn run(args: BootArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let out = rt.block_on(run_async(args.cmd))?;
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

async fn call<F, Fut, T>(port: &PortArgs, f: F) -> anyhow::Result<T>
where
    F: FnOnce(boot_ctl::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, capnp::Error>>,
{
    rpc_client::with_client(
        &port.port,
        Daemon::Bootctld,
        Duration::from_secs(port.timeout),
        f,
    )
    .await
    .map_err(Into::into)
}

async fn run_async(cmd: BootCmd) -> anyhow::Result<String> {
    match cmd {
        BootCmd::Status { json: true, port } => {
            let text = call(&port, |c| async move {
                let resp = c.export_json_request().send().promise.await?;
                Ok(resp.get()?.get_json()?.to_string()?)
            })
            .await?;
            serde_json::from_str::<serde_json::Value>(&text)
                .context("bootctld sent a JSON view that does not parse")?;
            Ok(text)
        }
        BootCmd::Status { json: false, port } => {
            call(&port, |c| async move {
                let resp = c.state_request().send().promise.await?;
                let r = resp.get()?;
                let mut out = render_status(r.get_state()?, r.get_persistent())?;
                let view = c.export_json_request().send().promise.await?;
                let view = view.get()?.get_json()?.to_string()?;
                out.push_str(&render_bootloader(&view));
                Ok(out)
            })
            .await
        }
        BootCmd::SetActive {
            slot,
            trial,
            tries,
            port,
        } => {
            let tries = if trial { tries } else { 0 };
            call(&port, move |c| async move {
                let mut req = c.set_active_request();
                req.get().set_slot(slot.wire());
                req.get().set_trial(trial);
                req.get().set_tries_left(tries);
                req.send().promise.await?;
                Ok(())
            })
            .await?;
            Ok(if trial {
                format!(
                    "slot {} is active for the next boot, on trial ({tries} tries)\n",
                    slot.name()
                )
            } else {
                format!("slot {} is active for the next boot\n", slot.name())
            })
        }
        BootCmd::Confirm { port } => {
            call(&port, |c| async move {
                c.confirm_request().send().promise.await?;
                Ok(())
            })
            .await?;
            Ok("confirmed: the booted slot is good\n".into())
        }
        BootCmd::Reboot { port } => {
            let real = call(&port, |c| async move {
                let resp = c.reboot_request().send().promise.await?;
                Ok(resp.get()?.get_rebooting())
            })
            .await?;
            Ok(if real {
                "the guest is rebooting into the normal boot\n".into()
            } else {
                "stub: bootctld cannot reboot this guest (no rebootd managed by PID 1); nothing happened\n".into()
            })
        }
        BootCmd::MarkBad { slot, port } => {
            call(&port, move |c| async move {
                let mut req = c.mark_bad_request();
                req.get().set_slot(slot.wire());
                req.send().promise.await?;
                Ok(())
            })
            .await?;
            Ok(format!(
                "slot {} is marked bad (until it is re-imaged)\n",
                slot.name()
            ))
        }
    }
}

pub(crate) fn slot_name(s: Result<bc::Slot, capnp::NotInSchema>) -> &'static str {
    match s {
        Ok(bc::Slot::A) => "a",
        Ok(bc::Slot::B) => "b",
        Err(_) => "?",
    }
}

pub(crate) fn health_name(h: Result<bc::Health, capnp::NotInSchema>) -> &'static str {
    match h {
        Ok(bc::Health::Empty) => "empty",
        Ok(bc::Health::Unknown) => "unknown",
        Ok(bc::Health::Good) => "good",
        Ok(bc::Health::Bad) => "bad",
        Err(_) => "?",
    }
}

/// Printable text from the guest, bounded and without control characters.
fn clean(t: capnp::Result<capnp::text::Reader<'_>>) -> String {
    let s = t
        .ok()
        .and_then(|t| t.to_str().ok().map(str::to_string))
        .unwrap_or_default();
    printable(&s)
}

/// `s` bounded to 64 characters, control characters replaced.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The bootloader's side of `nx boot status`, from bootctld's JSON view: what it boots next,
/// its entries, and whether that agrees with bootctld's active slot.
fn render_bootloader(view: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(view) else {
        return String::new();
    };
    let active = v["active"].as_str().unwrap_or("?");
    let b = &v["bootloader"];
    if b.is_null() {
        return "bootloader: not known (bootctld has no ESP: stub/placeholder)\n".to_string();
    }
    let entries: Vec<String> = b["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str()).map(printable).collect())
        .unwrap_or_default();
    let next = b["next"].as_str().map(printable);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bootloader: entries {}",
        if entries.is_empty() {
            "(none)".to_string()
        } else {
            entries.join(", ")
        }
    );
    if let Some(booted) = b["booted_entry"].as_str() {
        let _ = writeln!(out, "bootloader: this boot came from {}", printable(booted));
    }
    match (next, b["agrees"].as_bool().unwrap_or(false)) {
        (Some(n), true) => {
            let _ = writeln!(
                out,
                "bootloader: boots slot {n} next (agrees with bootctld)"
            );
        }
        (Some(n), false) => {
            let _ = writeln!(
                out,
                "bootloader: boots slot {n} next, but bootctld's active slot is {active}: they DISAGREE \
                 (the next boot reconciles; `nx boot set-active {active}` rewrites the entry)"
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "bootloader: no slot entry with tries left: the next boot starts recovery"
            );
        }
    }
    out
}

/// The human table of `nx boot status`.
fn render_status(s: bc::boot_state::Reader<'_>, persistent: bool) -> capnp::Result<String> {
    let active = slot_name(s.get_active());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<7} {:<8} {:<6} {:<6} version",
        "slot", "active", "health", "trial", "tries"
    );
    for (name, info) in [("a", s.get_slot_a()?), ("b", s.get_slot_b()?)] {
        let version = if info.has_version() {
            clean(info.get_version())
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<5} {:<7} {:<8} {:<6} {:<6} {}",
            name,
            if name == active { "*" } else { "" },
            health_name(info.get_health()),
            if info.get_trial() { "yes" } else { "no" },
            info.get_tries_left(),
            version
        );
    }
    if s.has_last_boot() {
        let lb = s.get_last_boot()?;
        if lb.get_valid() {
            let _ = writeln!(
                out,
                "last boot: slot {}{}",
                slot_name(lb.get_slot()),
                if lb.get_trial() { " (trial)" } else { "" }
            );
        }
    }
    let _ = writeln!(
        out,
        "storage: {}",
        if persistent {
            "persistent (STATE/bootctl/state.nxs in the guest)"
        } else {
            "RAM-only stub/placeholder — the guest has no /state; nothing survives a reboot"
        }
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootloaders_view_and_disagreement() {
        let agree = r#"{"active":"b","bootloader":{"booted_entry":"nexus-2-b+2-1.conf","entries":["nexus-2-b+2-1.conf","nexus-1-a.conf"],"next":"b","agrees":true}}"#;
        let t = render_bootloader(agree);
        assert!(
            t.contains("entries nexus-2-b+2-1.conf, nexus-1-a.conf"),
            "{t}"
        );
        assert!(t.contains("this boot came from nexus-2-b+2-1.conf"), "{t}");
        assert!(
            t.contains("boots slot b next (agrees with bootctld)"),
            "{t}"
        );
        let disagree = r#"{"active":"a","bootloader":{"booted_entry":null,"entries":["nexus-2-b+3.conf","nexus-1-a.conf"],"next":"b","agrees":false}}"#;
        assert!(render_bootloader(disagree).contains("DISAGREE"));
        let none = r#"{"active":"a","bootloader":{"booted_entry":null,"entries":["nexus-1-a+0-3.conf"],"next":null,"agrees":false}}"#;
        assert!(render_bootloader(none).contains("next boot starts recovery"));
        assert!(render_bootloader(r#"{"active":"a"}"#).contains("stub/placeholder"));
    }
}
