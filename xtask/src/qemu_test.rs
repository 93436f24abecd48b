//! `cargo xtask qemu_test`.

/// Arguments of `cargo xtask qemu_test`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask qemu_test: stub/placeholder — not implemented yet")
}
