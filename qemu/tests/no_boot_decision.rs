#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Architecture invariant: the runner never decides what boots — the firmware and the disk's
//! own bootloader do (docs/runner/boot.md).

use std::path::{Path, PathBuf};

fn sources() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.push((p, text));
        }
    }
    out
}

/// Lines of `text` that read the guest's state to choose a boot.
fn deciding_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("//")
                && (l.contains("debugfs") || l.contains("next_mode") || l.contains("NEXT_MODE"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_runner_reads_no_guest_state_to_choose_a_boot() {
    let bad: Vec<String> = sources()
        .iter()
        .flat_map(|(p, t)| {
            deciding_lines(t)
                .into_iter()
                .map(move |l| format!("{}: {l}", p.display()))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "the runner decides a boot:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_can_fail() {
    assert_eq!(
        deciding_lines("let t = read(\"debugfs -R cat /boot/next_mode\");").len(),
        1
    );
    assert!(deciding_lines("// debugfs is not used").is_empty());
}

#[test]
fn a_run_with_a_slot_disk_boots_the_firmware() {
    let mut c = nx_qemu::Config::new(Path::new("/b"));
    for recovery in [false, true] {
        c.recovery = recovery;
        let a: Vec<String> = c
            .qemu_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let j = a.join(" ");
        assert!(j.contains("if=pflash"), "{j}");
        assert!(
            !j.contains("-kernel") && !j.contains("-initrd") && !j.contains("-no-reboot"),
            "{j}"
        );
    }
}
