//! Golden list of the factory-reset plan for a seeded /state tree, and its guarantees:
//! exactly apps/content/settings are wiped, trust is listed and preserved, the plan is
//! deterministic and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use nx_contract::reset_plan::Plan;
use nx_reset::{plan, plan_with, Limits};

#[test]
fn golden_plan_for_a_seeded_tree() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    let before = common::fingerprint(d.path());
    let p = plan(d.path()).unwrap();
    assert!(p.is_sane());
    insta::assert_snapshot!("plan_text", p.render_text());
    insta::assert_snapshot!("plan_json", p.to_json());
    // Read only.
    assert_eq!(common::fingerprint(d.path()), before);
}

#[test]
fn plan_is_deterministic_across_identical_trees() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    common::seed(a.path());
    common::seed(b.path());
    let pa = plan(a.path()).unwrap().to_json();
    let pb = plan(b.path()).unwrap().to_json();
    assert_eq!(pa, pb);
    assert_eq!(pa, plan(a.path()).unwrap().to_json());
    // The JSON round-trips.
    let back = Plan::from_json(&pa).unwrap();
    assert_eq!(back.to_json(), pa);
}

#[test]
fn wiped_trees_are_exactly_three_and_trust_is_listed() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    let p = plan(d.path()).unwrap();
    let wiped: Vec<_> = p.wiped.iter().map(|t| t.path.as_str()).collect();
    assert_eq!(wiped, ["/state/apps", "/state/content", "/state/settings"]);
    let preserved: Vec<_> = p.preserved.iter().map(|t| t.path.as_str()).collect();
    assert_eq!(
        preserved,
        [
            "/state/trust",
            "/state/boot",
            "/state/bootctl",
            "/state/flash",
            "/state/recovery",
            "/state/lost+found"
        ]
    );
    let trust = &p.preserved[0];
    assert!(trust.listed);
    assert_eq!(trust.files, 3);
    assert_eq!(trust.bytes, 32 + 1200 + 900);
    // A symlink into trust is wiped as a link; trust itself stays listed as preserved.
    assert!(p.wiped[0]
        .entries
        .iter()
        .any(|e| e.path == "/state/apps/link-to-trust" && e.target.as_deref() == Some("../trust")));
    assert_eq!(
        p.totals.wiped_bytes,
        1000 + 17 + 8 + 4096 + 12345 + 5 + 42 + 6
    );
}

#[test]
fn listing_is_bounded_but_counts_stay_exact() {
    let d = tempfile::tempdir().unwrap();
    common::seed(d.path());
    for i in 0..50 {
        std::fs::write(d.path().join(format!("apps/many-{i:03}")), b"xy").unwrap();
    }
    let p = plan_with(
        d.path(),
        &Limits {
            max_entries: 10,
            ..Limits::default()
        },
    )
    .unwrap();
    assert!(p.wiped[0].truncated);
    assert_eq!(p.wiped[0].entries.len(), 10);
    assert_eq!(p.wiped[0].files, 52);
    assert!(p.render_text().contains("more paths not listed"));
}

#[test]
fn missing_trees_and_a_symlinked_tree_root() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x"), b"data").unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("apps")).unwrap();
    let p = plan(d.path()).unwrap();
    assert_eq!(p.wiped[0].kind, "symlink");
    assert!(p.wiped[0].entries.is_empty(), "never followed");
    assert_eq!(p.wiped[1].kind, "missing");
    assert_eq!(p.totals.wiped_paths, 1);
}

#[test]
fn no_state_dir_is_an_error_that_says_so() {
    let err = plan(std::path::Path::new("/nonexistent/state")).unwrap_err();
    assert!(err.to_string().contains("is /state mounted?"), "{err}");
}
