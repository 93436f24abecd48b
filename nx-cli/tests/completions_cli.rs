//! `nx completions bash|zsh|fish` with the real binary: a script for every shell, knowing the
//! verbs; an unknown shell is a usage error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const NX: &str = env!("CARGO_BIN_EXE_nx");

#[test]
fn every_shell_gets_a_script_that_knows_the_verbs() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(NX)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        for word in ["flash", "image", "completions", "port", "compress"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
}

#[test]
fn the_bash_script_is_valid_bash_and_offers_fixed_values() {
    let out = Command::new(NX)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    // Fixed values are offered: --compress, `nx flash reboot`.
    assert!(script.contains("auto zstd none"), "no --compress values");
    assert!(script.contains("normal recovery"), "no reboot targets");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nx.bash");
    std::fs::write(&path, &out.stdout).unwrap();
    let st = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run bash ({e}): `apt-get install -y bash` (`cargo xtask` installs it)")
        });
    assert!(st.success(), "bash -n rejected the script");
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = Command::new(NX)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bash") && stderr.contains("fish"),
        "{stderr}"
    );
}
