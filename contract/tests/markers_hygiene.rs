//! Hygiene of the marker contract, read from the source tree:
//! (a) guest code never builds a console marker by hand — markers come only from
//!     `nx_contract::markers`;
//! (b) every marker `qemu/markers.toml` expects is produced by a constructor of
//!     `nx_contract::markers` (see [`nx_contract::markers::catalogue`]) or is a declared prefix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------------
// (a) markers come only from the contract module
// ---------------------------------------------------------------------------------------------

/// Guest crates whose markers are migrated by other branches of issue #12 (flashd, rebootd,
/// bootctld). Their offences are reported but do not fail the test; the integrator empties
/// this list once those branches are merged.
const PENDING_CRATES: &[&str] = &[];

/// Program prefixes of console markers: a string literal starting with one of these is a
/// marker formatted by hand. (`"rebootd: "` / `"bootctld: "` are not listed: clients prefix
/// their error contexts with the daemon's name; the daemons' own lines are caught by
/// [`HAND_MADE_CALLS`].) A line that is console text but not a marker says so with a
/// `// hygiene: not a marker (<why>)` comment on it or on the line before.
const MARKER_PREFIXES: &[&str] = &[
    "\"init: ",
    "\"recovery: ",
    "\"SELFTEST: ",
    "\"selftest-client: ",
    "\"nx: reset",
    "\"rawrecv: ",
    "\"nx-diag: ",
    "\"flashd: ",
    "\"bootctl: ",
    "\"shutdown: ",
    "\"recovery-sh: ",
    "\"{P}: ",
    "\"{prefix}: ",
];

/// Calls that print a hand-made line.
const HAND_MADE_CALLS: &[&str] = &[
    "emit(&format!",
    "emit(\"",
    "emit(format!",
    "marker!(",
    "markers(&format!",
    "markers(\"",
    "marker::emit(",
];

/// Programs whose console lines are markers: `println!("<program>: …")` (or `eprintln!`) is a
/// marker printed by hand.
const PROGRAMS: &[&str] = &[
    "init",
    "recovery",
    "recovery-sh",
    "SELFTEST",
    "selftest-client",
    "nx",
    "rawrecv",
    "nx-diag",
    "flashd",
    "rebootd",
    "bootctl",
    "bootctld",
    "shutdown",
];

fn printed_by_hand(line: &str) -> bool {
    PROGRAMS.iter().any(|p| {
        line.contains(&format!("println!(\"{p}: ")) || line.contains(&format!("print!(\"{p}: "))
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without `#[cfg(test)]` items (the attribute and the item that follows it, up to
/// its matching closing brace) and without `//` comments.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        if let Some(depth) = skip_depth.as_mut() {
            *depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
            if *depth <= 0 && (code.contains('}') || code.trim_end().ends_with(';')) {
                skip_depth = None;
            }
            continue;
        }
        if line.trim_start().starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test {
            pending_cfg_test = false;
            let depth = code.matches('{').count() as i32 - code.matches('}').count() as i32;
            if depth > 0 {
                skip_depth = Some(depth);
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Blank out the lines a `// hygiene: not a marker` comment excuses (its own line, or the
/// next line when the comment stands alone).
fn excuse_not_markers(text: &str) -> String {
    const EXCUSE: &str = "// hygiene: not a marker";
    let mut out = Vec::new();
    let mut excuse_next = false;
    for line in text.lines() {
        if line.trim_start().starts_with(EXCUSE) {
            excuse_next = true;
            out.push("");
        } else if excuse_next || line.contains(EXCUSE) {
            excuse_next = false;
            out.push("");
        } else {
            out.push(line);
        }
    }
    out.join("\n")
}

/// `(crate, file, line number, line)` of every hand-made marker in the guest crates.
fn offences() -> Vec<(String, PathBuf, usize, String)> {
    let guest = root().join("guest");
    let mut crates: Vec<PathBuf> = std::fs::read_dir(&guest)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("src").is_dir())
        .collect();
    crates.sort();
    let mut found = Vec::new();
    for krate in crates {
        let name = krate.file_name().unwrap().to_string_lossy().to_string();
        let mut files = Vec::new();
        rust_files(&krate.join("src"), &mut files);
        files.sort();
        for f in files {
            // Test-only files of a crate.
            let fname = f.file_name().unwrap().to_string_lossy().to_string();
            if fname == "tests.rs" || fname == "testkit.rs" {
                continue;
            }
            let text = excuse_not_markers(&std::fs::read_to_string(&f).unwrap());
            for (i, line) in production_code(&text).lines().enumerate() {
                let compact: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
                let hand_made_call = HAND_MADE_CALLS.iter().any(|c| compact.contains(c))
                    && !compact.contains("fn emit(");
                let hand_made_text = MARKER_PREFIXES.iter().any(|p| compact.contains(p))
                    || printed_by_hand(&compact);
                if hand_made_call || hand_made_text {
                    found.push((name.clone(), f.clone(), i + 1, line.trim().to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn markers_come_only_from_the_contract_module() {
    let all = offences();
    let (pending, mine): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(krate, ..)| PENDING_CRATES.contains(&krate.as_str()));
    if !pending.is_empty() {
        eprintln!(
            "{} hand-made marker line(s) in crates migrated by other branches ({PENDING_CRATES:?}); \
             they fail this test once PENDING_CRATES is emptied:",
            pending.len()
        );
        for (_, f, n, l) in &pending {
            eprintln!("  pending {}:{n}: {l}", f.display());
        }
    }
    let listing: Vec<String> = mine
        .iter()
        .map(|(_, f, n, l)| format!("{}:{n}: {l}", f.display()))
        .collect();
    assert!(
        listing.is_empty(),
        "console markers formatted by hand (use a constructor of nx_contract::markers and \
         nx_guest::marker::show):\n{}",
        listing.join("\n")
    );
}

#[test]
fn production_code_drops_cfg_test_items() {
    let text =
        "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn b() { emit(\"init: x\"); }\n}\nfn c() {}\n";
    let code = production_code(text);
    assert!(code.contains("fn a()"));
    assert!(code.contains("fn c()"));
    assert!(!code.contains("emit("));
}

// ---------------------------------------------------------------------------------------------
// (b) every marker of qemu/markers.toml has a constructor
// ---------------------------------------------------------------------------------------------

/// Markers of flashd, rebootd and bootctld expected by `qemu/markers.toml`: their constructors
/// are added by the other branches of issue #12. The integrator empties this list.
const PENDING_OTHER_ENGINEERS: &[&str] = &[];

/// Lines of `qemu/markers.toml` that no constructor produces: the shell's echo of typed input
/// after its prompt (`recovery> <input>`), the slot table's header and a word of the reset
/// plan that recovery-sh prints, and the cancel answer shared with nx-recovery. (The runner's
/// own `[nx-qemu]` lines are skipped by [`RUNNER_PREFIX`].) Kept explicit so a new marker
/// cannot slip in unnoticed.
const NOT_CONSTRUCTED_YET: &[&str] = &[
    "recovery> sh",
    "recovery> /bin/sh",
    "recovery> exec /bin/sh",
    "recovery> aaaaaaaaaaaaaaaa",
    "recovery> help",
    "recovery> slot status",
    "slot  active  health   trial  tries  version",
    "recovery> diag",
    "recovery> reset factory",
    "WIPED",
    "recovery-sh: factory reset cancelled: the answer was \"no\", not \"yes\"; nothing was changed",
];

/// The runner's (qemu/src) lines start with this; they are the host's, not a guest marker.
const RUNNER_PREFIX: &str = "[nx-qemu] ";

/// Lines of programs that are not ours (the kernel), expected by a scenario.
const FOREIGN_LINES: &[&str] = &["Kernel panic - not syncing"];

/// Keys whose strings are expected on the console (`forbidden`, `send`, `description` and
/// `cmdline` are not).
const EXPECTING_KEYS: &[&str] = &["markers", "ready", "present", "expect", "resume_markers"];

fn expected_strings(v: &toml::Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) if key.is_some_and(|k| EXPECTING_KEYS.contains(&k)) => {
            out.push(s.clone());
        }
        toml::Value::Array(a) => {
            for x in a {
                expected_strings(x, key, out);
            }
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                expected_strings(x, Some(k), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_marker_of_markers_toml_has_a_constructor() {
    let text = std::fs::read_to_string(root().join("qemu/markers.toml")).unwrap();
    let doc: toml::Value = toml::from_str(&text).unwrap();
    let mut expected = Vec::new();
    expected_strings(&doc, None, &mut expected);
    expected.sort();
    expected.dedup();
    assert!(expected.len() > 50, "parsed too few markers: {expected:?}");
    let catalogue = nx_contract::markers::catalogue();
    let mut missing = Vec::new();
    for m in &expected {
        let constructed = catalogue.iter().any(|c| c.as_str().contains(m.as_str()))
            || nx_contract::markers::PREFIXES.contains(&m.as_str());
        let allowed = PENDING_OTHER_ENGINEERS.contains(&m.as_str())
            || NOT_CONSTRUCTED_YET.contains(&m.as_str())
            || FOREIGN_LINES.contains(&m.as_str())
            || m.starts_with(RUNNER_PREFIX);
        if !constructed && !allowed {
            missing.push(m.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "markers of qemu/markers.toml no constructor of nx_contract::markers produces:\n{}",
        missing.join("\n")
    );
    // The allowlists hold only strings the toml still expects (nothing stale).
    for s in PENDING_OTHER_ENGINEERS.iter().chain(NOT_CONSTRUCTED_YET) {
        assert!(
            expected.iter().any(|m| m == s),
            "stale allowlist entry {s:?}"
        );
        assert!(
            !catalogue.iter().any(|c| c.as_str().contains(s)),
            "{s:?} has a constructor now: drop it from the allowlist"
        );
    }
}

#[test]
fn catalogue_lines_are_single_lines() {
    for m in nx_contract::markers::catalogue() {
        assert!(!m.as_str().contains('\n'), "{m:?}");
        assert!(!m.as_str().is_empty());
    }
}

#[test]
fn constructors_spell_the_historic_lines() {
    use nx_contract::markers::{init, pid1, recovery, reset};
    // A few lines byte for byte as the guest printed them before the contract existed.
    assert_eq!(
        init::started(&["rebootd", "bootctld"]).as_str(),
        "init: started [rebootd, bootctld]"
    );
    assert_eq!(
        recovery::started(&["flashd".to_string(), "rebootd".to_string()]).as_str(),
        "recovery: started flashd, rebootd"
    );
    assert_eq!(
        pid1::shutdown_killing(3000, &["a", "b"]).as_str(),
        "shutdown: still running after 3000 ms, killing: a, b"
    );
    assert_eq!(
        reset::wipe_removed(8, 5459, &["apps", "content", "settings"]).as_str(),
        "nx: reset factory wipe removed 8 paths (5459 bytes) from apps, content, settings"
    );
    assert_eq!(
        init::boot_attempt("b", true, 2, true).as_str(),
        "init: bootAttempt slot=b trial=true tries_left=2 (rolled back)"
    );
    assert_eq!(
        pid1::uptime_at_ready("recovery", 1.234).as_str(),
        "recovery: uptime 1.23 s at ready"
    );
    assert_eq!(
        init::rootfs_unusable("b", true, "bad").as_str(),
        "init: rootfs unusable slot=b trial=true: bad"
    );
}
