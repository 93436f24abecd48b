//! recovery-sh over the real backend: rebootd and bootctld served in-process on unix
//! sockets (like the guest's /run/*.sock, rebootd with its stub reboot method), nx-diag on
//! a temp-dir /state. Checks what each built-in really writes: nothing, except `diag` (under
//! `recovery/`), a confirmed `reset factory` and `reboot normal|recovery` (rebootd's records
//! under `boot/`). Plain `reboot` / `poweroff` signal PID 1 and are never sent here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use nx_recovery::guest::GuestConfig;
use recovery_sh::guest::GuestBackend;
use recovery_sh::{Shell, PROMPT};
use std::collections::BTreeMap;
use std::path::Path;

fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("apps/notes.db"), vec![1u8; 500]).unwrap();
    std::fs::write(root.join("content/song.ogg"), vec![2u8; 70]).unwrap();
    std::fs::write(root.join("settings/locale"), b"en\n").unwrap();
    std::fs::write(root.join("trust/root.pub"), [9u8; 32]).unwrap();
}

/// Every file and dir under `root` with its content.
fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                todo.push(e.path());
            } else {
                out.insert(rel, Some(std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// The paths that differ between two trees.
fn changed(
    a: &BTreeMap<String, Option<Vec<u8>>>,
    b: &BTreeMap<String, Option<Vec<u8>>>,
) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[test]
fn builtins_against_real_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let reboot_sock = dir.path().join("rebootd.sock");
    let bootctl_sock = dir.path().join("bootctld.sock");
    let _rebootd = TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: Some(state.clone()),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        &reboot_sock,
    )
    .unwrap();
    let _bootctld = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(&state),
            "boot-1",
            RebootVia::Stub("test".into()),
        )),
        &bootctl_sock,
    )
    .unwrap();
    let mut cfg = GuestConfig::guest();
    cfg.state_root = state.clone();
    cfg.require_mountpoint = false;
    cfg.rebootd = reboot_sock;
    cfg.bootctld = bootctl_sock;
    cfg.kmsg_sources = vec![dir.path().join("no-kmsg")];
    let mut backend = GuestBackend { cfg };
    let mut shell = Shell::new();
    let mut run = |input: &str| -> String {
        let mut out = Vec::new();
        shell.feed(&mut backend, input.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    };

    // Settle the daemons' own start-up files, then nothing may change.
    let slots = run("slot status\r");
    assert!(slots.contains("a     *       good"), "{slots}");
    assert!(slots.contains("storage: persistent"), "{slots}");
    let before = tree(&state);

    let mut read_only =
        String::from("help\rslot status\rsh\r/bin/sh\rexec /bin/sh\rreboot now\rdiag please\r");
    read_only.push_str(&"q".repeat(10 * 1024));
    read_only.push('\r');
    let out = run(&read_only);
    assert!(out.contains("recovery-sh: error: unknown command '/bin/sh'"));
    assert!(out.contains("line longer than 256 bytes"));
    // The plan, then wrong answers and Ctrl-C: cancelled.
    let r = run("reset factory\r");
    assert!(r.contains("/state/apps/  1 file, 0 dirs, 500 bytes"), "{r}");
    assert!(r.contains("trust"), "{r}");
    assert!(r.ends_with("Type yes to continue: "), "{r}");
    let r = run("yes\r");
    let device = r
        .rsplit_once("Type the device name (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(name, _)| name.to_string())
        .unwrap();
    assert!(!device.is_empty(), "{r}");
    let r = run(&format!("{device}x\r"));
    assert!(r.contains("factory reset cancelled"), "{r}");
    let r = run(&format!("reset factory\ryes\r{}\x03", &device));
    assert!(r.contains("factory reset cancelled (Ctrl-C)"), "{r}");
    assert!(r.ends_with(PROMPT));
    assert_eq!(
        changed(&before, &tree(&state)),
        Vec::<String>::new(),
        "read-only unless asked"
    );

    // diag writes a bundle under recovery/ and nothing else.
    let r = run("diag\r");
    assert!(r.contains("recovery: diag written (bytes="), "{r}");
    assert!(!r.contains("recovery: diag written (bytes=0)"), "{r}");
    let after_diag = tree(&state);
    let diff = changed(&before, &after_diag);
    assert!(!diff.is_empty());
    assert!(
        diff.iter().all(|p| p.starts_with("recovery/")),
        "diag writes only /state/recovery: {diff:?}"
    );

    // A confirmed reset: rebootd records the request (stub: no reboot), nothing is wiped now.
    let r = run(&format!("reset factory\ryes\r{device}\r"));
    assert!(
        r.contains("the wipe request is recorded, but rebootd cannot reboot here (stub)"),
        "{r}"
    );
    assert!(r.ends_with(PROMPT), "{r}");
    assert_eq!(
        std::fs::read(state.join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
    assert_eq!(
        std::fs::read(state.join("boot/next_mode")).unwrap(),
        b"recovery\n"
    );
    let diff = changed(&after_diag, &tree(&state));
    assert!(
        diff.iter().all(|p| p.starts_with("boot")),
        "only rebootd's records: {diff:?}"
    );

    // reboot normal goes through rebootd (the one reboot authority).
    let r = run("reboot normal\r");
    assert!(r.contains("next boot: normal (recorded)"), "{r}");
    assert_eq!(
        std::fs::read(state.join("boot/next_mode")).unwrap(),
        b"normal\n"
    );
    assert!(
        state.join("apps/notes.db").exists(),
        "the wipe runs in recovery-init"
    );
}

#[test]
fn daemons_and_state_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GuestConfig::guest();
    cfg.state_root = dir.path().join("no-state");
    cfg.rebootd = dir.path().join("none.sock");
    cfg.bootctld = dir.path().join("none2.sock");
    cfg.kmsg_sources = vec![dir.path().join("no-kmsg")];
    cfg.timeout = std::time::Duration::from_secs(2);
    let mut backend = GuestBackend { cfg };
    let mut shell = Shell::new();
    let mut out = Vec::new();
    shell.feed(
        &mut backend,
        b"diag\rslot status\rreset factory\ryes\rreboot recovery\r",
        &mut out,
    );
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("nx-diag: not available"), "{out}");
    assert!(
        out.contains("\nrecovery: diag written (bytes=0)\n"),
        "{out}"
    );
    let errors: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("recovery-sh: error:"))
        .collect();
    assert_eq!(errors.len(), 4, "{out}");
    assert!(
        errors[0].contains("slot status unavailable: bootctld on"),
        "{out}"
    );
    assert!(errors[0].contains("is bootctld running?"), "{out}");
    assert!(
        errors[1].contains("factory reset unavailable: rebootd on"),
        "{out}"
    );
    assert!(errors[2].contains("unknown command 'yes'"), "{out}");
    assert!(
        errors[3].contains("reboot recovery failed: rebootd on"),
        "{out}"
    );
    assert!(out.ends_with(PROMPT));
    assert!(!dir.path().join("no-state").exists(), "nothing created");
}

/// The binary on a pipe (no tty, no raw mode): the acceptance inputs, then EOF ends it.
/// Never sends `reboot` / `poweroff` (they would signal the host's PID 1).
#[test]
fn binary_refuses_shells_and_long_lines() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recovery-sh"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = b"help\rsh\r/bin/sh\rexec /bin/sh\r".to_vec();
    input.extend(std::iter::repeat_n(b'A', 10 * 1024));
    input.extend_from_slice(b"\rbusybox\r");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&input).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("recovery: shell ready\n"), "{text}");
    assert!(text.contains("recovery-sh: built-ins"), "{text}");
    for cmd in ["sh", "/bin/sh", "exec", "busybox"] {
        assert!(
            text.contains(&format!(
                "recovery-sh: error: unknown command '{cmd}' (type 'help')\n{PROMPT}"
            )),
            "{cmd}: {text}"
        );
    }
    assert!(
        text.contains("recovery-sh: error: line longer than 256 bytes, ignored; nothing was run\n")
    );
    assert!(text.ends_with(PROMPT), "{text}");
    assert!(text.len() < 4096, "bounded echo: {}", text.len());
}
