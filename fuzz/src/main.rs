//! `nx-fuzz seed DIR` writes every target's generated seeds to `DIR/<target>/seed-N`;
//! `nx-fuzz replay TARGET FILE…` runs one target over files (a crash from a campaign);
//! `nx-fuzz list` names the targets. `cargo xtask fuzz` drives it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            for t in nx_fuzz::TARGETS {
                println!("{:<10} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some("seed") if args.len() == 2 => {
            let dir = std::path::Path::new(&args[1]);
            for t in nx_fuzz::TARGETS {
                let d = dir.join(t.name);
                let seeds = nx_fuzz::seeds(t.name);
                let written = std::fs::create_dir_all(&d).and_then(|()| {
                    for (i, s) in seeds.iter().enumerate() {
                        std::fs::write(d.join(format!("seed-{i}")), s)?;
                    }
                    Ok(())
                });
                if let Err(e) = written {
                    eprintln!("nx-fuzz: cannot write the seeds to {}: {e}", d.display());
                    return ExitCode::FAILURE;
                }
                println!(
                    "nx-fuzz: {}: {} seeds in {}",
                    t.name,
                    seeds.len(),
                    d.display()
                );
            }
            ExitCode::SUCCESS
        }
        Some("replay") if args.len() >= 3 => {
            let Some(t) = nx_fuzz::target(&args[1]) else {
                eprintln!("nx-fuzz: no target {:?} (`nx-fuzz list`)", args[1]);
                return ExitCode::from(2);
            };
            for f in &args[2..] {
                match std::fs::read(f) {
                    Ok(data) => {
                        (t.run)(&data);
                        println!("nx-fuzz: {}: {f} ok", t.name);
                    }
                    Err(e) => {
                        eprintln!("nx-fuzz: cannot read {f}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: nx-fuzz list | seed DIR | replay TARGET FILE…");
            ExitCode::from(2)
        }
    }
}
