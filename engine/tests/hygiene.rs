//! Architecture invariant held by reading the engine's sources: the engine never writes to a
//! terminal — it reports progress as `EngineEvent`s to a `ProgressSink` and failures as typed
//! errors. No printing macro, no `std::io::stdout`/`stderr`, no terminal crate in `src/` or in
//! the crate's dependencies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// What writes to a terminal (or pulls in something that does).
const FORBIDDEN: &[&str] = &[
    "println!",
    "eprintln!",
    "print!(",
    "eprint!(",
    "dbg!(",
    "indicatif",
    "std::io::stdout",
    "std::io::stderr",
    "io::stdout(",
    "io::stderr(",
];

/// Crates that draw on a terminal or parse a command line: never dependencies of the engine.
const FORBIDDEN_DEPS: &[&str] = &["indicatif", "clap", "console", "dialoguer", "crossterm"];

fn engine_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.push((p, text));
        }
    }
}

/// Code lines (comment lines dropped) of `files` containing a forbidden pattern.
fn offenders(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (path, text) in files {
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            // One report per line: the longest pattern it contains (`eprintln!`, not `println!`).
            if let Some(needle) = FORBIDDEN
                .iter()
                .filter(|n| line.contains(*n))
                .max_by_key(|n| n.len())
            {
                bad.push(format!("{}:{}: {needle}: {t}", path.display(), i + 1));
            }
        }
    }
    bad
}

/// Forbidden crates named in the `[dependencies]`-like tables of a Cargo.toml.
fn forbidden_deps(manifest: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t.contains("dependencies");
            continue;
        }
        if !in_deps {
            continue;
        }
        let name = t.split(['=', '.', ' ']).next().unwrap_or("");
        if FORBIDDEN_DEPS.contains(&name) {
            bad.push(name.to_string());
        }
    }
    bad
}

#[test]
fn the_engine_never_writes_to_a_terminal() {
    let mut files = Vec::new();
    sources(&engine_dir().join("src"), &mut files);
    assert!(files.len() >= 5, "found only {} source files", files.len());
    let bad = offenders(&files);
    assert!(
        bad.is_empty(),
        "the engine writes to a terminal; report an EngineEvent to the ProgressSink (or return \
         a typed error) and let nx-cli show it:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_engine_depends_on_no_terminal_crate() {
    let manifest = std::fs::read_to_string(engine_dir().join("Cargo.toml")).unwrap();
    let bad = forbidden_deps(&manifest);
    assert!(bad.is_empty(), "nx-engine depends on {bad:?}");
}

#[test]
fn the_checks_can_fail() {
    let planted = vec![
        (
            PathBuf::from("planted.rs"),
            "fn f() {\n    eprintln!(\"nx: hi\");\n    // println!(\"a comment is fine\");\n    \
             let _ = std::io::stderr();\n    let _b = indicatif::ProgressBar::new(1);\n}\n"
                .to_string(),
        ),
        (
            PathBuf::from("clean.rs"),
            "fn g(s: &mut dyn ProgressSink) { s.event(&EngineEvent::Finished) }\n".to_string(),
        ),
    ];
    let bad = offenders(&planted);
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert!(bad[0].starts_with("planted.rs:2: eprintln!"), "{bad:?}");
    assert!(
        bad[1].starts_with("planted.rs:4: std::io::stderr"),
        "{bad:?}"
    );
    assert!(bad[2].starts_with("planted.rs:5: indicatif"), "{bad:?}");
    assert_eq!(
        forbidden_deps(
            "[package]\nname = \"indicatif\"\n[dependencies]\nindicatif.workspace = true\n\
             thiserror.workspace = true\n[dev-dependencies]\nclap = \"4\"\n"
        ),
        vec!["indicatif".to_string(), "clap".to_string()]
    );
}
