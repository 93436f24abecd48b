//! flashd binary: parse arguments, open the link, serve. All logic is in the library.

use anyhow::Context;
use clap::Parser;
use flashd::config::{Args, Source};
use flashd::console::{Output, StdOutput};
use flashd::link::{Acceptor, MultiAcceptor, PortAcceptor, UnixAcceptor};
use flashd::server::Server;
use nx_contract::markers;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    nx_guest::alloc::fix_mmap_threshold();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            StdOutput.show(&markers::flashd::error(0, text.replace('\n', " ")));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let (source, cfg) = args.resolve().context("invalid arguments")?;
    StdOutput.log(&flashd::choose_crc_engine());
    let mut server = Server::new(cfg, Arc::new(StdOutput)).context("cannot start flashd")?;
    let mut acceptor: Box<dyn Acceptor> = match &source {
        Source::Listen(path) => Box::new(UnixAcceptor::bind(path)?),
        Source::Port(name) => Box::new(open_port(name)?),
        Source::Links { port, uart } => {
            let mut links = Vec::new();
            if let Some(name) = port {
                let dev = wait_for_port(name);
                let file = open_port_file(name, &dev)?;
                links.push((file, dev.display().to_string()));
            }
            match open_uart(uart) {
                Ok(file) => links.push((file, uart.display().to_string())),
                // The virtio-serial port alone still flashes: say why the UART does not.
                Err(e) if !links.is_empty() => StdOutput.log(&format!(
                    "not serving {}: {e:#}; flashing over the virtio-serial port only",
                    uart.display()
                )),
                Err(e) => return Err(e),
            }
            let multi = MultiAcceptor::new(links)?;
            server.announce();
            for name in multi.names() {
                eprintln!("{}", markers::flashd::serving_on(name));
            }
            let mut acceptor = multi;
            server.serve(&mut acceptor, args.once)?;
            return Ok(());
        }
    };
    server.announce();
    eprintln!("{}", markers::flashd::serving_on(acceptor.describe()));
    server.serve(acceptor.as_mut(), args.once)?;
    Ok(())
}

/// The virtio-serial port `name`, waited for and opened once.
fn open_port(name: &str) -> anyhow::Result<PortAcceptor> {
    let dev = wait_for_port(name);
    let file = open_port_file(name, &dev)?;
    Ok(PortAcceptor::from_file(file, &dev)?)
}

/// Open the port device of `name` (see [`flashd::link::open_port_device`]).
fn open_port_file(name: &str, dev: &std::path::Path) -> anyhow::Result<std::fs::File> {
    flashd::link::open_port_device(dev).with_context(|| {
        format!(
            "cannot open the virtio-serial port {name} at {}",
            dev.display()
        )
    })
}

/// The UART, when there is one behind the device node, as a raw line.
fn open_uart(dev: &std::path::Path) -> anyhow::Result<std::fs::File> {
    anyhow::ensure!(
        nx_guest::uart::present(dev),
        "no UART behind {} ({}/<name>/type is missing or 0)",
        dev.display(),
        nx_guest::uart::SYS_CLASS_TTY
    );
    nx_guest::uart::open_raw(dev).with_context(|| format!("cannot open the UART {}", dev.display()))
}

/// Find the port by name; it may show up a little after the driver loads. Never gives up
/// (flashd is the only way to flash this target), but says what it is waiting for.
fn wait_for_port(name: &str) -> std::path::PathBuf {
    let mut warned = false;
    loop {
        match nx_guest::port::wait(name, Duration::from_secs(10)) {
            Ok(p) => return p,
            Err(e) => {
                if !warned {
                    StdOutput.log(&format!("still waiting for virtio-serial port {name}: {e}"));
                    warned = true;
                }
            }
        }
    }
}
