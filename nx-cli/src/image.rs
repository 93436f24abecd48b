//! `nx image …`: build, verify, inspect images and make signing keys.

use std::process::ExitCode;

/// Arguments of `nx image`.
#[derive(clap::Args)]
pub struct ImageArgs {}

/// Run `nx image …`.
pub fn run(_args: ImageArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("nx image: stub/placeholder — not implemented yet")
}
