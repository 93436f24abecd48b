#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Repo hygiene for the sans-IO core, as ordinary tests (ARCHITECTURE.md):
//! `proto` never depends on tokio and never opens a file or a socket.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn proto_has_no_runtime_dependency_on_tokio() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .unwrap();
    for line in deps.lines().filter(|l| l.contains("tokio")) {
        assert!(
            line.contains("optional = true"),
            "proto depends on tokio outside the `codec` feature: {line}"
        );
    }
}

#[test]
fn proto_does_no_io() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 5);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for bad in [
            "std::fs",
            "std::net",
            "File::open",
            "File::create",
            "UnixStream",
            "TcpStream",
            "tokio::",
        ] {
            assert!(
                !text.contains(bad),
                "{} uses `{bad}`: proto is sans-IO",
                f.display()
            );
        }
    }
}
