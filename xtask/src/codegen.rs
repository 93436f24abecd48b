//! `cargo xtask codegen`.

/// Arguments of `cargo xtask codegen`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask codegen: stub/placeholder — not implemented yet")
}
