//! Architecture invariants held by reading the workspace's sources:
//! - one transport: only `nx-rpc` (guest/rpc/src/lib.rs) sets up a Cap'n Proto RPC system;
//! - one port finder: only `nx_guest::port` names the virtio-ports sysfs directory;
//! - host crates never depend on guest programs (flashd, rebootd, bootctld, init, …: every
//!   guest crate with a `main.rs`, and nx-reset, the guest's wipe).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Every `.rs` file of the workspace (not target/, build/, hidden directories).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            if !matches!(name.as_str(), "target" | "build") && !name.starts_with('.') {
                sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// Code lines (comment lines dropped) of `files` that contain `needle`, outside `allowed`.
fn offenders(files: &[(PathBuf, String)], needle: &str, allowed: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for (path, text) in files {
        let rel = path.strip_prefix(root()).unwrap_or(path);
        if allowed.iter().any(|a| rel == Path::new(a)) {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            if line.contains(needle) {
                bad.push(format!("{}:{}: {}", rel.display(), i + 1, t));
            }
        }
    }
    bad
}

/// This file names the patterns it looks for.
const THIS_FILE: &str = "guest/rpc/tests/hygiene.rs";

fn workspace_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    sources(&root(), &mut files);
    assert!(
        files.len() > 100,
        "the scan found only {} files",
        files.len()
    );
    files
        .into_iter()
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect()
}

#[test]
fn one_transport() {
    let files = workspace_sources();
    for needle in ["RpcSystem::new(", "VatNetwork::new("] {
        let hits = offenders(&files, needle, &[THIS_FILE]);
        assert_eq!(
            hits.len(),
            1,
            "`{needle}` must appear exactly once, in guest/rpc/src/lib.rs (nx_rpc::connection): {hits:#?}"
        );
        assert!(hits[0].starts_with("guest/rpc/src/lib.rs:"), "{hits:?}");
    }
}

#[test]
fn one_port_finder() {
    let files = workspace_sources();
    let hits = offenders(
        &files,
        "\"/sys/class/virtio-ports\"",
        &["guest/common/src/port.rs", THIS_FILE],
    );
    assert!(
        hits.is_empty(),
        "only nx_guest::port reads the virtio-ports sysfs directory (use nx_guest::port::find / \
         SYS_VIRTIO_PORTS): {hits:#?}"
    );
}

/// The guest programs: crates no host crate may depend on (for shared types, use a library:
/// nx-contract, proto, nx-rpc, nx-guest). Every guest crate with a `src/main.rs`
/// (`every_guest_program_is_listed`), plus nx-reset (the guest's wipe of `/state`; its plan
/// type lives in `nx_contract::reset_plan`).
const DAEMONS: &[&str] = &[
    "flashd",
    "rebootd",
    "bootctld",
    "init",
    "recovery-init",
    "recovery-sh",
    "nx-recovery",
    "nx-diag",
    "nx-reset",
    "selftest-client",
    "rawrecv",
];
/// The host crates.
const HOST_CRATES: &[&str] = &["nx-cli", "engine", "qemu", "xtask", "proto", "contract"];

/// The package name of the crate in `dir` (its Cargo.toml).
fn package_name(dir: &Path) -> String {
    let m = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let doc: toml::Value = toml::from_str(&m).unwrap();
    doc["package"]["name"].as_str().unwrap().to_string()
}

#[test]
fn every_guest_program_is_listed() {
    let mut programs = Vec::new();
    for e in std::fs::read_dir(root().join("guest")).unwrap() {
        let dir = e.unwrap().path();
        if dir.join("src/main.rs").exists() {
            programs.push(package_name(&dir));
        }
    }
    assert!(programs.len() >= 10, "{programs:?}");
    for p in &programs {
        assert!(
            DAEMONS.contains(&p.as_str()),
            "guest program {p} is missing from DAEMONS in {THIS_FILE}"
        );
    }
}

fn daemon_deps(manifest: &str) -> Vec<String> {
    let doc: toml::Value = toml::from_str(manifest).unwrap();
    let Some(deps) = doc.get("dependencies").and_then(|d| d.as_table()) else {
        return Vec::new();
    };
    deps.keys()
        .filter(|k| DAEMONS.contains(&k.as_str()))
        .cloned()
        .collect()
}

#[test]
fn host_crates_never_depend_on_guest_daemons() {
    for c in HOST_CRATES {
        let m = std::fs::read_to_string(root().join(c).join("Cargo.toml")).unwrap();
        let bad = daemon_deps(&m);
        assert!(
            bad.is_empty(),
            "host crate {c} depends on guest program(s) {bad:?}: move the shared types into a \
             library crate (dev-dependencies for in-process tests are fine)"
        );
    }
}

#[test]
fn the_checks_can_fail() {
    // A second RPC setup, a second port finder, a daemon dependency: each is caught.
    let fake = vec![
        (
            root().join("nx-cli/src/x.rs"),
            "let s = RpcSystem::new(net, None);\n// RpcSystem::new( in a comment".to_string(),
        ),
        (
            root().join("guest/init/src/x.rs"),
            "let d = std::fs::read_dir(\"/sys/class/virtio-ports\");".to_string(),
        ),
    ];
    assert_eq!(offenders(&fake, "RpcSystem::new(", &[]).len(), 1);
    assert_eq!(
        offenders(
            &fake,
            "\"/sys/class/virtio-ports\"",
            &["guest/common/src/port.rs"]
        )
        .len(),
        1
    );
    assert_eq!(
        daemon_deps("[dependencies]\nbootctld = { path = \"../guest/bootctld\" }\n[dev-dependencies]\nflashd = { path = \"x\" }\n"),
        vec!["bootctld".to_string()]
    );
    assert_eq!(
        daemon_deps("[dependencies]\nnx-reset = { path = \"../guest/nx-reset\" }\nnx-contract.workspace = true\n"),
        vec!["nx-reset".to_string()]
    );
}
