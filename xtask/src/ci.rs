//! `cargo xtask ci` — everything CI runs, in order, stopping at the first failure.

use crate::util::{cargo, run_cmd};

/// Arguments of `cargo xtask ci`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run_cmd(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run_cmd(cargo().args(["test", "--workspace"]))?;
    Ok(())
}
