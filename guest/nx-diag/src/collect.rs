//! Gathering the members (reads only; every read bounded; nothing from `/state` is trusted:
//! names and values are escaped before they become text).

use crate::bootctl::View;
use crate::bundle::Member;
use crate::Config;
use nx_contract::reset_plan::Kind;
use nx_reset::walk::{self, display, Event, Skip, WalkOptions};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;

/// State files are read bounded and never through a symlink planted in `/state`.
use nx_guest::fsx::read_bounded_nofollow as read_bounded;

/// Format of the bundle (in `MANIFEST.txt`).
pub const FORMAT: u32 = 1;

/// Member caps (bytes).
pub mod cap {
    pub const KERNEL_LOG: usize = 128 * 1024;
    pub const CONSOLE_LOG: usize = 128 * 1024;
    pub const STATE_TREE: usize = 96 * 1024;
    pub const FLASH: usize = 16 * 1024;
    pub const BOOTCTL_JSON: usize = 16 * 1024;
    pub const BOOTCTL_SNAPSHOT: usize = 16 * 1024;
    pub const NEXT_BOOT: usize = 4 * 1024;
}

/// The member names, sorted (the order in the archive).
pub const MEMBERS: [&str; 8] = [
    "MANIFEST.txt",
    "bootctl-state.nxs",
    "bootctl.json",
    "console.log",
    "flash.txt",
    "kernel.log",
    "next-boot.txt",
    "state-tree.txt",
];

/// Room kept in a capped text member for the truncation note.
const NOTE_ROOM: usize = 200;

struct Note {
    name: &'static str,
    source: String,
    truncated: Option<String>,
}

/// Read every source and build the members (see the crate docs). Deterministic for the
/// same inputs.
pub fn gather(cfg: &Config, bootctl: &View) -> Vec<Member> {
    let root = &cfg.state_root;
    let mut members = Vec::new();
    let mut notes = Vec::new();

    // Kernel log: the tail.
    let (data, note) = match crate::kmsg::read(&cfg.kmsg_sources, cap::KERNEL_LOG - NOTE_ROOM) {
        Ok((text, src, dropped)) => tail_member(text, dropped, &src),
        Err(why) => not_available(&format!("no kernel log ({why})")),
    };
    push(&mut members, &mut notes, "kernel.log", data, note);

    // Console / marker log: the tail of the given file.
    let (data, note) = match &cfg.console_log {
        None => not_available(
            "no console log file was given (--console-log); the guest console is not captured to a file",
        ),
        Some(p) => match read_tail(p, cap::CONSOLE_LOG - NOTE_ROOM) {
            Ok((text, dropped)) => tail_member(text, dropped, &p.display().to_string()),
            Err(e) => not_available(&format!("cannot read {} ({e})", p.display())),
        },
    };
    push(&mut members, &mut notes, "console.log", data, note);

    // bootctld's JSON view.
    let (data, note) = match bootctl {
        View::Json { text, source } if text.len() <= cap::BOOTCTL_JSON => {
            (text.clone().into_bytes(), (source.clone(), None))
        }
        View::Json { text, source } => json_unavailable(&format!(
            "{source} sent {} bytes (over the cap)",
            text.len()
        )),
        View::Unavailable(why) => json_unavailable(why),
    };
    push(&mut members, &mut notes, "bootctl.json", data, note);

    // The raw snapshot.
    let snap = root.join(nx_contract::state::BOOTCTL_SNAPSHOT);
    let (data, note) = match read_bounded(&snap, cap::BOOTCTL_SNAPSHOT) {
        Ok(Some(b)) => (b, (snap.display().to_string(), None)),
        Ok(None) => (
            Vec::new(),
            (format!("{} (absent: empty member)", snap.display()), None),
        ),
        Err(e) => (
            Vec::new(),
            (
                format!("{} (unreadable: {e}; empty member)", snap.display()),
                None,
            ),
        ),
    };
    push(&mut members, &mut notes, "bootctl-state.nxs", data, note);

    let text = next_boot(root);
    push(
        &mut members,
        &mut notes,
        "next-boot.txt",
        cut_text(text, cap::NEXT_BOOT),
        (format!("{}/boot", root.display()), None),
    );

    let (text, truncated) = state_tree(root, cap::STATE_TREE - NOTE_ROOM);
    push(
        &mut members,
        &mut notes,
        "state-tree.txt",
        text.into_bytes(),
        (root.display().to_string(), truncated),
    );

    let text = flash_summary(root);
    push(
        &mut members,
        &mut notes,
        "flash.txt",
        cut_text(text, cap::FLASH),
        (format!("{}/flash", root.display()), None),
    );

    members.push(Member {
        name: "MANIFEST.txt".into(),
        data: manifest(&members, &notes).into_bytes(),
    });
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members
}

fn push(
    members: &mut Vec<Member>,
    notes: &mut Vec<Note>,
    name: &'static str,
    data: Vec<u8>,
    (source, truncated): (String, Option<String>),
) {
    members.push(Member {
        name: name.to_string(),
        data,
    });
    notes.push(Note {
        name,
        source,
        truncated,
    });
}

fn manifest(members: &[Member], notes: &[Note]) -> String {
    let mut s = format!(
        "nx-diag bundle format {FORMAT}\n\
         Every member is capped; a cut member says so in its first or last line and below.\n\n"
    );
    let mut rows: Vec<(&str, usize, &Note)> = notes
        .iter()
        .filter_map(|n| {
            members
                .iter()
                .find(|m| m.name == n.name)
                .map(|m| (n.name, m.data.len(), n))
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    for (name, len, note) in rows {
        let _ = writeln!(s, "{name:<18} {len:>7} bytes  from {}", clean(&note.source));
        if let Some(t) = &note.truncated {
            let _ = writeln!(s, "{:<18} {:>7}        TRUNCATED: {t}", "", "");
        }
    }
    s
}

/// Text from the environment, escaped like a path (printable ASCII only).
fn clean(s: &str) -> String {
    display(s.as_bytes())
}

fn not_available(why: &str) -> (Vec<u8>, (String, Option<String>)) {
    (
        format!("not available: {why}\n").into_bytes(),
        ("-".into(), None),
    )
}

fn json_unavailable(why: &str) -> (Vec<u8>, (String, Option<String>)) {
    let mut why: String = why.chars().take(1024).collect();
    why = clean(&why);
    let v = serde_json::json!({ "not_available": why });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    (s.into_bytes(), ("-".into(), None))
}

fn tail_member(text: Vec<u8>, dropped: u64, source: &str) -> (Vec<u8>, (String, Option<String>)) {
    if dropped == 0 {
        return (text, (source.to_string(), None));
    }
    let note = format!(
        "the first {dropped} bytes were dropped, the last {} kept",
        text.len()
    );
    let mut data = format!("[nx-diag: TRUNCATED: {note}]\n").into_bytes();
    data.extend_from_slice(&text);
    (data, (source.to_string(), Some(note)))
}

fn cut_text(mut text: String, cap: usize) -> Vec<u8> {
    if text.len() > cap {
        let mut cut = cap.saturating_sub(NOTE_ROOM);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = text.len() - cut;
        text.truncate(cut);
        let _ = writeln!(
            text,
            "\n[nx-diag: TRUNCATED: the last {dropped} bytes were dropped]"
        );
    }
    text.into_bytes()
}

fn read_tail(path: &Path, cap: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(cap as u64);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(cap as u64).read_to_end(&mut buf)?;
    Ok((buf, start))
}

fn next_boot(root: &Path) -> String {
    let mut s = String::new();
    for (label, rel, max) in [
        (
            "next_mode",
            nx_contract::state::NEXT_MODE,
            nx_contract::state::MAX_NEXT_MODE,
        ),
        ("factory_wipe", nx_reset::REQUEST, 64),
        ("factory_wipe.journal", nx_reset::JOURNAL, 1024),
    ] {
        let p = root.join(rel);
        match read_bounded(&p, max) {
            Ok(None) => {
                let _ = writeln!(s, "{label}: absent");
            }
            Ok(Some(b)) => {
                let _ = writeln!(s, "{label}: \"{}\" ({} bytes)", display(&b), b.len());
            }
            Err(e) => {
                let _ = writeln!(s, "{label}: unreadable ({e})");
            }
        }
    }
    let verdict = match nx_reset::pending(root) {
        Ok(nx_reset::Pending::None) => "none".to_string(),
        Ok(nx_reset::Pending::Requested { attempts }) => {
            format!("requested ({attempts} attempts started)")
        }
        Ok(nx_reset::Pending::Invalid { .. }) => {
            "invalid request (recovery removes it, wipes nothing)".into()
        }
        Err(e) => format!("unknown ({e})"),
    };
    let _ = writeln!(s, "factory wipe: {verdict}");
    s
}

/// `kind size /state/path[ -> target]`, depth first, names sorted; the head up to `cap`.
fn state_tree(root: &Path, cap: usize) -> (String, Option<String>) {
    let mut out = String::new();
    let mut more_lines = 0u64;
    let mut line = |l: String, out: &mut String| {
        if out.len() + l.len() < cap && more_lines == 0 {
            out.push_str(&l);
        } else {
            more_lines += 1;
        }
    };
    let fd = match walk::open_root(root) {
        Ok(fd) => fd,
        Err(e) => {
            return (
                format!("not available: cannot open {} ({e})\n", root.display()),
                None,
            )
        }
    };
    let mut names = match list(root) {
        Ok(n) => n,
        Err(e) => {
            return (
                format!("not available: cannot list {} ({e})\n", root.display()),
                None,
            )
        }
    };
    names.sort();
    let opts = WalkOptions { max_depth: 32 };
    for name in names {
        let r = walk::walk(fd.as_fd(), &name, &opts, &mut |e| match e {
            Event::Node(n) => {
                let target = n
                    .target
                    .as_deref()
                    .map(|t| format!(" -> {}", display(t)))
                    .unwrap_or_default();
                let kind = match n.kind {
                    Kind::File => "f",
                    Kind::Dir => "d",
                    Kind::Symlink => "l",
                    Kind::Other => "o",
                };
                line(
                    format!("{kind} {:>12} /state/{}{target}\n", n.size, display(&n.rel)),
                    &mut out,
                );
            }
            Event::Error { rel, error } => line(
                format!("! unreadable /state/{}: {error}\n", display(&rel)),
                &mut out,
            ),
            Event::Skipped { rel, why } => line(
                format!(
                    "! not descended /state/{}: {}\n",
                    display(&rel),
                    match why {
                        Skip::MountPoint => "another file system",
                        Skip::TooDeep => "deeper than 32 levels",
                    }
                ),
                &mut out,
            ),
        });
        if let Err(e) = r {
            line(
                format!("! unreadable /state/{}: {e}\n", display(&name)),
                &mut out,
            );
        }
    }
    if more_lines > 0 {
        let note = format!("{more_lines} more lines were dropped");
        let _ = writeln!(out, "[nx-diag: TRUNCATED: {note}]");
        return (out, Some(note));
    }
    (out, None)
}

fn list(root: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let mut v = Vec::new();
    for e in std::fs::read_dir(root)? {
        v.push(e?.file_name().as_bytes().to_vec());
    }
    Ok(v)
}

/// A JSON value from /state, shown bounded and escaped.
fn shown_value(v: Option<&serde_json::Value>) -> String {
    match v {
        None => "-".into(),
        Some(serde_json::Value::String(s)) => {
            let s: String = s.chars().take(128).collect();
            format!("\"{}\"", display(s.as_bytes()))
        }
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => b.to_string(),
        Some(other) => {
            let s: String = other.to_string().chars().take(128).collect();
            display(s.as_bytes())
        }
    }
}

/// flashd's records under `root/flash`, summarised (the `flash.txt` member; the recovery
/// menu's flash mode shows it too).
pub fn flash_summary(root: &Path) -> String {
    let dir = root.join("flash");
    let mut s = String::new();
    let size_of = |name: &str| {
        std::fs::symlink_metadata(dir.join(name))
            .ok()
            .map(|m| m.len())
    };
    match read_bounded(&dir.join("journal.json"), 64 * 1024) {
        Ok(None) => s.push_str("journal.json: absent (no transfer in progress)\n"),
        Err(e) => {
            let _ = writeln!(s, "journal.json: unreadable ({e})");
        }
        Ok(Some(b)) => match serde_json::from_slice::<serde_json::Value>(&b) {
            Err(e) => {
                let _ = writeln!(s, "journal.json: {} bytes, not valid JSON ({e})", b.len());
            }
            Ok(j) => {
                let _ = writeln!(s, "journal.json: {} bytes (a transfer to resume)", b.len());
                for key in [
                    "version",
                    "image_id",
                    "image_sha256",
                    "total_size",
                    "chunk_size",
                    "plan_chunks",
                    "durable_seq",
                    "durable_offset",
                ] {
                    let _ = writeln!(s, "  {key}: {}", shown_value(j.get(key)));
                }
                if let Some(v) = j.get("verified").and_then(|v| v.as_array()) {
                    let ok = v.iter().filter(|x| x.as_bool() == Some(true)).count();
                    let _ = writeln!(s, "  verified segments: {ok} of {}", v.len());
                }
            }
        },
    }
    match size_of("staging.img") {
        None => s.push_str("staging.img: absent\n"),
        Some(n) => {
            let _ = writeln!(s, "staging.img: {n} bytes");
        }
    }
    for (name, keys) in [
        ("installed.json", &["version", "image_id"][..]),
        (
            "last-install.json",
            &[
                "state",
                "image_version",
                "image_id",
                "target",
                "tries",
                "resume_count",
                "wire_bytes",
            ][..],
        ),
        (
            "counters.json",
            &["image_id", "tries", "resume_count", "wire_bytes"][..],
        ),
    ] {
        match read_bounded(&dir.join(name), 256 * 1024) {
            Ok(None) => {
                let _ = writeln!(s, "{name}: absent");
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "{name}: {} bytes, not summarised ({e})",
                    size_of(name).map_or("?".into(), |n| n.to_string())
                );
            }
            Ok(Some(b)) => match serde_json::from_slice::<serde_json::Value>(&b) {
                Err(e) => {
                    let _ = writeln!(s, "{name}: {} bytes, not valid JSON ({e})", b.len());
                }
                Ok(j) => {
                    let _ = writeln!(s, "{name}: {} bytes", b.len());
                    for key in keys {
                        if j.get(key).is_some() {
                            let _ = writeln!(s, "  {key}: {}", shown_value(j.get(key)));
                        }
                    }
                }
            },
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_noted() {
        let (data, (_, note)) = tail_member(b"abc".to_vec(), 5, "x");
        assert!(String::from_utf8(data)
            .unwrap()
            .starts_with("[nx-diag: TRUNCATED: the first 5 bytes"));
        assert!(note.is_some());
        let cut = cut_text("é".repeat(1000), 500);
        assert!(cut.len() <= 500);
        assert!(String::from_utf8(cut).unwrap().contains("TRUNCATED"));
    }
}
