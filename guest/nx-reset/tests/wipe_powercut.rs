//! The factory wipe: exact markers, trust byte-identical, symlinks never followed, and a
//! power cut after any number of removals resumes to the same end state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use nx_reset::{pending, wipe, wipe_with, Pending, ResetError, WipeOptions, WipeOutcome};
use std::path::Path;

fn request(root: &Path) {
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/factory_wipe"), b"wipe\n").unwrap();
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).unwrap().is_dir() && std::fs::read_dir(p).unwrap().next().is_none()
}

/// Everything outside apps/content/settings (and the request + journal).
fn preserved(root: &Path) -> Vec<String> {
    common::fingerprint(root)
        .into_iter()
        .filter(|l| {
            let top = l.split(['/', ' ']).next().unwrap_or_default();
            !["apps", "content", "settings"].contains(&top) && !l.starts_with("boot/factory_wipe")
        })
        .collect()
}

fn wiped_end_state(root: &Path) {
    for t in ["apps", "content", "settings"] {
        assert!(is_empty_dir(&root.join(t)), "{t} is not empty");
    }
    assert!(!root.join("boot/factory_wipe").exists());
    assert!(!root.join("boot/factory_wipe.journal").exists());
    assert_eq!(pending(root).unwrap(), Pending::None);
}

#[test]
fn no_request_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    let before = common::fingerprint(d.path());
    let mut lines = Vec::new();
    let out = wipe(d.path(), &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(out, WipeOutcome::NotRequested);
    assert!(lines.is_empty());
    assert_eq!(common::fingerprint(d.path()), before);
}

#[test]
fn wipe_removes_exactly_the_three_trees() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    // Hostile content: a hard link to a trust file, a symlink to trust, a symlink to a
    // directory outside /state.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep"), b"outside").unwrap();
    std::fs::hard_link(
        d.path().join("trust/root.pub"),
        d.path().join("settings/hard"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("content/out")).unwrap();
    std::os::unix::fs::symlink(
        "../../trust/certs",
        d.path().join("apps/com.example.game/c"),
    )
    .unwrap();
    request(d.path());
    let keep = preserved(d.path());
    let outside_before = common::fingerprint(outside.path());
    let plan_before = nx_reset::plan(d.path()).unwrap();

    let mut lines = Vec::new();
    let out = wipe(d.path(), &mut |l| lines.push(l.to_string())).unwrap();
    let WipeOutcome::Wiped(report) = out else {
        panic!("{out:?}")
    };
    assert_eq!(report.attempt, 1);
    assert_eq!(report.removed, plan_before.totals.wiped_paths);
    assert_eq!(report.bytes, plan_before.totals.wiped_bytes);
    assert_eq!(
        lines.first().map(String::as_str),
        Some("nx: reset factory wipe start")
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("nx: reset factory wipe done")
    );
    wiped_end_state(d.path());
    assert_eq!(
        preserved(d.path()),
        keep,
        "trust and the rest are byte-identical"
    );
    assert_eq!(common::fingerprint(outside.path()), outside_before);
    // The plan afterwards: nothing left to wipe.
    let after = nx_reset::plan(d.path()).unwrap();
    assert_eq!(after.totals.wiped_paths, 0);
}

#[test]
fn power_cut_after_every_removal_count_resumes_to_the_same_state() {
    let probe = tempfile::tempdir().unwrap();
    common::seed(probe.path());
    let total = nx_reset::plan(probe.path()).unwrap().totals.wiped_paths;
    assert!(total > 10);
    for cut in 0..=total {
        let d = tempfile::tempdir().unwrap();
        common::seed(d.path());
        request(d.path());
        let keep = preserved(d.path());
        let err = wipe_with(
            d.path(),
            &WipeOptions {
                stop_after: Some(cut),
            },
            &mut |_| {},
        );
        if cut < total {
            assert!(
                matches!(err, Err(ResetError::Interrupted { removed }) if removed == cut),
                "{cut}: {err:?}"
            );
            // The cut left the request (and the journal): the next boot wipes again.
            assert_eq!(
                pending(d.path()).unwrap(),
                Pending::Requested { attempts: 1 }
            );
        } else {
            assert!(matches!(err, Ok(WipeOutcome::Wiped(_))), "{cut}: {err:?}");
            continue;
        }
        let mut lines = Vec::new();
        let out = wipe(d.path(), &mut |l| lines.push(l.to_string())).unwrap();
        let WipeOutcome::Wiped(r) = out else {
            panic!("{out:?}")
        };
        assert_eq!(r.attempt, 2);
        assert_eq!(r.removed, total - cut, "cut {cut}");
        assert!(
            lines.iter().any(|l| l.contains("resumed (attempt=2)")),
            "{lines:?}"
        );
        wiped_end_state(d.path());
        assert_eq!(
            preserved(d.path()),
            keep,
            "cut {cut}: trust must be byte-identical"
        );
    }
}

#[test]
fn tree_roots_replaced_by_symlinks_or_files() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    std::fs::remove_dir_all(d.path().join("apps")).unwrap();
    std::os::unix::fs::symlink("trust", d.path().join("apps")).unwrap();
    std::fs::remove_dir_all(d.path().join("content")).unwrap();
    std::fs::write(d.path().join("content"), b"not a dir").unwrap();
    std::fs::remove_dir_all(d.path().join("settings")).unwrap();
    request(d.path());
    let keep = preserved(d.path());
    wipe(d.path(), &mut |_| {}).unwrap();
    wiped_end_state(d.path());
    assert_eq!(preserved(d.path()), keep);
}

#[test]
fn very_deep_trees_are_wiped() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    let mut p = d.path().join("content");
    for _ in 0..300 {
        p.push("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("leaf"), b"x").unwrap();
    request(d.path());
    wipe(d.path(), &mut |_| {}).unwrap();
    wiped_end_state(d.path());
}

#[test]
fn invalid_request_is_removed_and_nothing_is_wiped() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    std::fs::write(d.path().join("boot/factory_wipe"), b"rm -rf /\n").unwrap();
    let before: Vec<_> = common::fingerprint(d.path())
        .into_iter()
        .filter(|l| !l.starts_with("boot/factory_wipe"))
        .collect();
    let mut lines = Vec::new();
    let out = wipe(d.path(), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        matches!(out, WipeOutcome::InvalidRequestRemoved { .. }),
        "{out:?}"
    );
    assert!(lines[0].contains("is invalid"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("wipe start")));
    assert_eq!(common::fingerprint(d.path()), before);
}

#[test]
fn stale_journal_without_a_request_is_cleaned() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    std::fs::write(d.path().join("boot/factory_wipe.journal"), b"{}").unwrap();
    assert_eq!(
        wipe(d.path(), &mut |_| {}).unwrap(),
        WipeOutcome::NotRequested
    );
    assert!(!d.path().join("boot/factory_wipe.journal").exists());
    assert!(d.path().join("apps/com.example.game/save-1").exists());
}

#[test]
fn a_symlink_planted_at_the_journal_temp_path_leaves_its_target_untouched() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    request(d.path());
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, d.path().join("boot/.factory_wipe.journal.tmp")).unwrap();
    let out = wipe(d.path(), &mut |_| {}).unwrap();
    assert!(matches!(out, WipeOutcome::Wiped(_)));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!d.path().join("boot/.factory_wipe.journal.tmp").exists());
    wiped_end_state(d.path());
}
