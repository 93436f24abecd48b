//! Replays the checked-in corpus (`fuzz/corpus/<target>/*`) and the generated seeds through
//! every target: what a campaign once found stays fixed, on the stable toolchain, every CI run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for t in nx_fuzz::TARGETS {
        let dir = root.join(t.name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask fuzz --seed`)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| (t.run)(&data));
            assert!(
                r.is_ok(),
                "{}: {} fails (replay with `cargo xtask fuzz {} --replay {}`)",
                t.name,
                f.display(),
                t.name,
                f.display()
            );
        }
        // The checked-in seeds are what the generator makes today.
        for (i, s) in nx_fuzz::seeds(t.name).iter().enumerate() {
            let p = dir.join(format!("seed-{i}"));
            let on_disk = std::fs::read(&p).unwrap_or_default();
            assert!(
                &on_disk == s,
                "{} differs from the generated seed: run `cargo xtask fuzz --seed`",
                p.display()
            );
        }
    }
}

#[test]
fn the_receiver_harness_installs_an_honest_transfer() {
    // The honest script must get through to DONE_REPLY, or the target proves nothing deep.
    let frames = nx_fuzz::seeds("msg");
    assert!(
        frames.len() > 4,
        "an honest session has HELLO, WRITEs, ACKs, DONE…"
    );
    // DONE_REPLY is among them.
    let done_reply = proto::msg::MsgType::DoneReply as u8;
    assert!(
        frames.iter().any(|f| f[0] == done_reply),
        "no DONE_REPLY: the honest session did not finish"
    );
}

#[test]
fn empty_and_junk_inputs_are_harmless() {
    for t in nx_fuzz::TARGETS {
        (t.run)(&[]);
        (t.run)(&[0xff; 64]);
    }
}
