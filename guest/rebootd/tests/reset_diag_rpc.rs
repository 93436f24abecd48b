//! rebootd's issue-6 methods over real Cap'n Proto RPC on a unix socket, rebootd served
//! in-process exactly like the binary: resetPlan (read only, same JSON as nx-reset),
//! factoryWipe (the request nx-reset's wipe consumes), fetchDiag, clearNext, RAM-only refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rebootd::record::Target;
use rebootd::{pid1::MethodArg, Config, Options};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct Server {
    stop: Option<futures::channel::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(state: Option<&Path>, socket: &Path, options: Options) -> Server {
    let config = Config {
        state: state.map(Path::to_path_buf),
        require_mountpoint: false,
        endpoints: vec![nx_rpc::Endpoint::Unix(socket.to_path_buf())],
        reboot_method: MethodArg::Stub,
    };
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let run = std::pin::pin!(rebootd::run_with(config, options));
            let _ = futures::future::select(run, rx).await;
        });
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "rebootd did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Server {
        stop: Some(tx),
        thread: Some(thread),
        socket: socket.to_path_buf(),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn options() -> Options {
    Options {
        device: "board-7".into(),
        bootctld_socket: None,
        console_log: None,
        kmsg_sources: vec![PathBuf::from("/nonexistent/kmsg")],
        efivars: None,
    }
}

fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::create_dir_all(root.join("apps/com.example")).unwrap();
    std::fs::write(root.join("apps/com.example/data"), vec![1u8; 100]).unwrap();
    std::fs::write(root.join("content/photo.jpg"), vec![2u8; 2000]).unwrap();
    std::fs::write(root.join("settings/locale"), b"en_US\n").unwrap();
    std::fs::write(root.join("trust/root.pub"), [3u8; 32]).unwrap();
}

fn listing(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            v.push(format!("{} {} {:?}", p.display(), m.len(), content));
        }
    }
    v.sort();
    v
}

#[test]
fn reset_plan_is_nx_resets_plan_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    seed(&state);
    let before = listing(&state);
    let s = serve(Some(&state), &d.path().join("reboot.sock"), options());
    let (json, device) = block_on(nx_rpc::reboot::request_reset_plan(&s.socket, T)).unwrap();
    assert_eq!(device, "board-7");
    assert_eq!(json, rebootd::nx_reset::plan(&state).unwrap().to_json());
    let plan = nx_contract::reset_plan::Plan::from_json(&json).unwrap();
    assert!(plan.is_sane());
    assert_eq!(plan.totals.wiped_bytes, 100 + 2000 + 6);
    assert_eq!(listing(&state), before, "resetPlan is read only");
}

#[test]
fn factory_wipe_records_the_request_nx_reset_consumes() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    seed(&state);
    let s = serve(Some(&state), &d.path().join("reboot.sock"), options());
    let rebooting = block_on(nx_rpc::reboot::request_factory_wipe(&s.socket, T)).unwrap();
    assert!(!rebooting, "stub reboot method in tests");
    assert_eq!(
        std::fs::read(state.join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
    assert_eq!(
        std::fs::read(state.join("boot/next_mode")).unwrap(),
        b"recovery\n"
    );
    let (target, wipe, persistent) =
        block_on(nx_rpc::reboot::request_pending(&s.socket, T)).unwrap();
    assert_eq!(
        (target, wipe, persistent),
        (Some(Target::Recovery), true, true)
    );
    // What recovery-init then does:
    let mut lines = Vec::new();
    rebootd::nx_reset::wipe(&state, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(lines.first().unwrap(), "nx: reset factory wipe start");
    assert_eq!(lines.last().unwrap(), "nx: reset factory wipe done");
    let (_, wipe, _) = block_on(nx_rpc::reboot::request_pending(&s.socket, T)).unwrap();
    assert!(!wipe);
    assert_eq!(
        std::fs::read(state.join("trust/root.pub")).unwrap(),
        [3u8; 32]
    );
    let (json, _) = block_on(nx_rpc::reboot::request_reset_plan(&s.socket, T)).unwrap();
    let plan = nx_contract::reset_plan::Plan::from_json(&json).unwrap();
    assert_eq!(plan.totals.wiped_paths, 0);
}

#[test]
fn fetch_diag_new_and_latest() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    seed(&state);
    let console = d.path().join("console.log");
    std::fs::write(&console, "rebootd: ready\n").unwrap();
    let mut opts = options();
    opts.console_log = Some(console);
    let s = serve(Some(&state), &d.path().join("reboot.sock"), opts);
    let err = block_on(nx_rpc::reboot::request_fetch_diag(&s.socket, false, T)).unwrap_err();
    assert!(err.to_string().contains("no diag bundle"), "{err}");
    let (name, data) = block_on(nx_rpc::reboot::request_fetch_diag(&s.socket, true, T)).unwrap();
    assert_eq!(name, "diag-1.tar.zst");
    assert_eq!(
        data,
        std::fs::read(state.join("recovery/diag-1.tar.zst")).unwrap()
    );
    let members = rebootd::nx_diag::bundle::decode(&data).unwrap();
    let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, rebootd::nx_diag::collect::MEMBERS);
    let console = members.iter().find(|m| m.name == "console.log").unwrap();
    assert_eq!(console.data, b"rebootd: ready\n");
    let bootctl = members.iter().find(|m| m.name == "bootctl.json").unwrap();
    assert!(String::from_utf8_lossy(&bootctl.data).contains("not_available"));
    let (name2, data2) = block_on(nx_rpc::reboot::request_fetch_diag(&s.socket, false, T)).unwrap();
    assert_eq!((name2.as_str(), &data2), ("diag-1.tar.zst", &data));
}

#[test]
fn clear_next_removes_the_record() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    seed(&state);
    let s = serve(Some(&state), &d.path().join("reboot.sock"), options());
    block_on(nx_rpc::reboot::request_set_next(
        &s.socket,
        Target::Recovery,
        T,
    ))
    .unwrap();
    assert!(state.join("boot/next_mode").exists());
    block_on(nx_rpc::reboot::request_clear_next(&s.socket, T)).unwrap();
    assert!(!state.join("boot/next_mode").exists());
    let (target, _, _) = block_on(nx_rpc::reboot::request_pending(&s.socket, T)).unwrap();
    assert_eq!(target, None);
}

#[test]
fn ram_only_refuses_plan_and_diag() {
    let d = tempfile::tempdir().unwrap();
    let s = serve(None, &d.path().join("reboot.sock"), options());
    let err = block_on(nx_rpc::reboot::request_reset_plan(&s.socket, T)).unwrap_err();
    assert!(err.to_string().contains("stub/placeholder"), "{err}");
    let err = block_on(nx_rpc::reboot::request_fetch_diag(&s.socket, true, T)).unwrap_err();
    assert!(err.to_string().contains("stub/placeholder"), "{err}");
    let err = block_on(nx_rpc::reboot::request_factory_wipe(&s.socket, T)).unwrap_err();
    assert!(err.to_string().contains("stub/placeholder"), "{err}");
}
