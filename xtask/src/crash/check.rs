//! What a crash state must satisfy, offline (host-side, on the rebuilt images) and after a
//! boot.
//!
//! Offline, every state: state.img's ext4 journal is replayed as the next mount would
//! (`e2fsck -E journal_only`), the file system is consistent (`e2fsck -fn`) and `/trust` is
//! byte-identical to what was provisioned. Then per path a prediction of what boots:
//! - slots (install, activation): the bootloader's choice modelled on the ESP — slot entries
//!   sorted as systemd-boot does with our `loader.conf` (entries out of tries last, then the
//!   newest generation first); the first whose slot image verifies (head parsed by
//!   `proto::image`, every segment's SHA-256 over the slot partition) and whose kernel and
//!   initramfs on the ESP match the manifest boots; a broken entry with tries left is
//!   skipped (the bootloader counts it down and falls back), a broken entry without a counter
//!   bricks the device. The result must be slot a version 1 or slot b version 2.
//! - boot-record: the one-shot variable in the variable store (recovery when set, else
//!   normal); `/state/boot/next_mode` is absent or a valid record.
//! - reset-wipe: the user data is untouched, a request is pending (recovery wipes or
//!   resumes), or the wipe is complete (apps, content, settings empty, no request) — never
//!   data gone with nothing to finish the job.

use crate::disks;
use crate::util::{self, capture};
use anyhow::{bail, ensure, Context};
use nx_contract::loader;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a state boots into (predicted offline or seen on the console).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Slot a, version 1 (before the install).
    Old,
    /// Slot b, version 2 (the install).
    New,
    /// The normal system (slot a).
    Normal,
    /// Recovery.
    Recovery,
    /// The factory reset never happened: the user data is all there.
    Untouched,
    /// A wipe request is on the disk: recovery wipes or resumes.
    Pending,
    /// The wipe is complete.
    Wiped,
    /// The offline model cannot tell (a variable store torn mid-write that the host's
    /// reader refuses, where the firmware's own recovery decides): such states are booted
    /// first.
    Unknown,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Old => "old slot (a, 1)",
            Verdict::New => "new slot (b, 2)",
            Verdict::Normal => "normal",
            Verdict::Recovery => "recovery",
            Verdict::Untouched => "untouched",
            Verdict::Pending => "wipe pending",
            Verdict::Wiped => "wiped",
            Verdict::Unknown => "unknown offline",
        }
    }
}

/// The trees a factory reset wipes (below /state).
const WIPED: [&str; 3] = ["apps", "content", "settings"];

fn debugfs(img: &Path, cmd: &str) -> anyhow::Result<String> {
    capture(
        Command::new(util::tool("debugfs")?)
            .arg("-R")
            .arg(cmd)
            .arg(img)
            .stderr(Stdio::null()),
    )
}

/// What state.img holds, read offline.
pub struct StateView {
    /// Names in /boot.
    pub boot: Vec<String>,
    /// `/boot/next_mode`, if any.
    pub next_mode: Option<Vec<u8>>,
    /// Where `/trust`, `/apps`, `/content` and `/settings` were dumped.
    pub dump: tempfile::TempDir,
}

/// Replay the journal of `img` in place (it is a rebuilt crash state), check the file system
/// and `/trust`, and read what the paths look at.
pub fn state_offline(img: &Path) -> anyhow::Result<StateView> {
    let e2fsck = util::tool("e2fsck")?;
    let st = Command::new(&e2fsck)
        .args(["-E", "journal_only", "-y"])
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("could not run e2fsck")?;
    ensure!(
        matches!(st.code(), Some(0 | 1)),
        "state.img: replaying the ext4 journal failed (e2fsck -E journal_only: {st})"
    );
    let out = Command::new(&e2fsck)
        .args(["-f", "-n"])
        .arg(img)
        .output()
        .context("could not run e2fsck")?;
    ensure!(
        out.status.success(),
        "state.img is inconsistent after the journal replay (e2fsck -fn: {}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let dump = tempfile::tempdir()?;
    debugfs(
        img,
        &format!(
            "rdump /trust /apps /content /settings {}",
            dump.path().display()
        ),
    )?;
    trust_intact(&dump.path().join("trust"))
        .context("/state/trust differs from what was provisioned")?;
    let boot = crate::e2e::ls_names(&debugfs(img, "ls -p /boot")?);
    let next_mode = if boot.iter().any(|n| n == "next_mode") {
        let p = dump.path().join("next_mode");
        debugfs(
            img,
            &format!("dump /{} {}", nx_contract::state::NEXT_MODE, p.display()),
        )?;
        Some(std::fs::read(&p).context("read the dumped next_mode")?)
    } else {
        None
    };
    Ok(StateView {
        boot,
        next_mode,
        dump,
    })
}

/// `/trust` as dumped is intact: every key and certificate byte-identical to the seed, and the
/// anti-rollback floor a number that only ever rose — from the seeded floor to at most the
/// highest security version of the images this build makes (the device raises it when it
/// confirms a slot; a torn, lowered or vanished floor is a failure).
pub fn trust_intact(dir: &Path) -> anyhow::Result<()> {
    let rel = nx_contract::state::TRUST_FLOOR
        .strip_prefix("trust/")
        .context("the floor lives under trust/")?;
    let path = dir.join(rel);
    // A cut between the atomic writer's temp file and its rename leaves `.NAME.tmp` beside the
    // old floor: harmless (the next write removes it first), so it is not a change.
    let _ = std::fs::remove_file(dir.join(format!(".{rel}.tmp")));
    let seeded = crate::guest::security_version(crate::guest::DEMO_VERSION);
    let highest = [
        crate::guest::DEMO_VERSION,
        crate::guest::V2_VERSION,
        crate::guest::BROKEN_VERSION,
        crate::guest::BADKERNEL_VERSION,
    ]
    .into_iter()
    .map(crate::guest::security_version)
    .max()
    .unwrap_or(seeded);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("the floor {rel} is gone or unreadable"))?;
    let floor: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("the floor {rel} is not a number: {text:?}"))?;
    anyhow::ensure!(
        (seeded..=highest).contains(&floor) && text == format!("{floor}\n"),
        "the floor {rel} is {text:?}: below the seeded {seeded}, above {highest}, or torn"
    );
    // The rest must be byte-identical: compare with the floor put back as seeded.
    std::fs::write(&path, format!("{seeded}\n"))
        .with_context(|| format!("rewrite {}", path.display()))?;
    crate::e2e::compare_seeded(dir, "trust")
}

/// The reset path's view of the state: untouched, pending or wiped; anything else fails.
pub fn wipe_state(v: &StateView) -> anyhow::Result<Verdict> {
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let request = v.boot.contains(&name(nx_contract::state::FACTORY_WIPE));
    let journal = v
        .boot
        .contains(&name(nx_contract::state::FACTORY_WIPE_JOURNAL));
    if request {
        return Ok(Verdict::Pending);
    }
    let untouched = WIPED
        .iter()
        .all(|t| crate::e2e::compare_seeded(&v.dump.path().join(t), t).is_ok());
    if untouched && !journal {
        return Ok(Verdict::Untouched);
    }
    let empty = |t: &str| {
        std::fs::read_dir(v.dump.path().join(t))
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    };
    if WIPED.iter().all(|t| empty(t)) && !journal {
        return Ok(Verdict::Wiped);
    }
    let left: Vec<String> = WIPED
        .iter()
        .map(|t| {
            let n = std::fs::read_dir(v.dump.path().join(t))
                .map(|d| d.count().to_string())
                .unwrap_or_else(|_| "missing".into());
            format!("{t}: {n}")
        })
        .collect();
    bail!(
        "the user data is partly wiped and no request is pending (journal {}; entries left {}): nothing will finish the wipe",
        if journal { "present" } else { "absent" },
        left.join(", ")
    )
}

/// The boot-record path's prediction: the one-shot variable decides; the record on /state
/// must be absent or valid.
pub fn boot_record(vars: &Path, v: &StateView) -> anyhow::Result<Verdict> {
    if let Some(b) = &v.next_mode {
        let s = b.strip_suffix(b"\n").unwrap_or(b);
        ensure!(
            s == b"normal" || s == b"recovery",
            "/state/boot/next_mode is torn: {:?}",
            String::from_utf8_lossy(b)
        );
    }
    let fd = std::fs::read(vars).with_context(|| format!("read {}", vars.display()))?;
    let guid = nx_qemu::varstore::guid_bytes(loader::LOADER_GUID).context("loader GUID")?;
    Ok(
        match nx_qemu::varstore::get(&fd, &guid, loader::LOADER_ENTRY_ONESHOT) {
            Ok(Some(_)) => Verdict::Recovery,
            Ok(None) => Verdict::Normal,
            // A variable write cut between two flash writes: OVMF's variable driver repairs
            // or ignores it at the next boot; the host's reader only knows complete stores.
            Err(_) => Verdict::Unknown,
        },
    )
}

fn mtools(bin: PathBuf, disk: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(format!(
        "{}@@{}",
        disk.display(),
        disks::esp_offset()
    ));
    c
}

/// The verified image in slot `slot` of `disk`: its version and its segments' hashes.
fn slot_image(disk: &Path, slot: char) -> anyhow::Result<proto::manifest::Manifest> {
    let f = std::fs::File::open(disk)?;
    let base = disks::slot_offset(slot);
    let mut head = vec![0u8; proto::image::HEADER_LEN];
    f.read_exact_at(&mut head, base)?;
    let h = proto::image::Header::parse(&head)
        .map_err(|e| anyhow::anyhow!("slot {slot}: no image header: {e}"))?;
    ensure!(
        h.data_offset <= proto::image::MAX_HEAD_LEN as u64 && h.total_size <= disks::SLOT_MIB << 20,
        "slot {slot}: header sizes out of bounds"
    );
    let mut head = vec![0u8; h.data_offset as usize];
    f.read_exact_at(&mut head, base)?;
    let ih = proto::image::ImageHead::parse(&head)
        .map_err(|e| anyhow::anyhow!("slot {slot}: image head: {e}"))?;
    let mut buf = Vec::new();
    for s in &ih.manifest.segments {
        buf.resize(s.size as usize, 0);
        f.read_exact_at(&mut buf, base + s.offset)?;
        let got: [u8; 32] = Sha256::digest(&buf).into();
        ensure!(
            got == s.sha256,
            "slot {slot}: segment {} does not match its manifest",
            s.name
        );
    }
    Ok(ih.manifest)
}

/// A file on the ESP matches a segment of the slot's manifest.
fn esp_file_matches(
    disk: &Path,
    path: &str,
    m: &proto::manifest::Manifest,
    seg: &str,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("f");
    let st = mtools(util::tool("mcopy")?, disk)
        .arg("-n")
        .arg(format!("::/{path}"))
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("mcopy")?;
    ensure!(st.success(), "{path} is missing on the ESP");
    let bytes = std::fs::read(&out)?;
    let s = m
        .segments
        .iter()
        .find(|s| s.name == seg)
        .with_context(|| format!("the image has no segment {seg}"))?;
    let got: [u8; 32] = Sha256::digest(&bytes).into();
    ensure!(
        got == s.sha256 && bytes.len() as u64 == s.size,
        "{path} on the ESP ({} bytes) is not the image's {seg} segment ({} bytes)",
        bytes.len(),
        s.size
    );
    Ok(())
}

/// The slot the bootloader boots from `disk` (see the module doc), with the entries it saw.
pub fn slot_offline(disk: &Path) -> anyhow::Result<(Verdict, String)> {
    let listing = capture(
        mtools(util::tool("mdir")?, disk)
            .args(["-b", &format!("::/{}", loader::ENTRIES_DIR)])
            .stderr(Stdio::null()),
    )
    .context("the ESP's entries directory cannot be listed")?;
    let mut entries: Vec<(loader::EntryName, u32, char)> = listing
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next())
        .filter_map(loader::EntryName::parse)
        .filter_map(|e| loader::parse_slot_entry_id(&e.id).map(|(g, s)| (e, g, s)))
        .collect();
    entries.sort_by(|a, b| a.0.is_bad().cmp(&b.0.is_bad()).then(b.1.cmp(&a.1)));
    let names: Vec<String> = entries.iter().map(|e| e.0.file_name()).collect();
    let seen = names.join(" ");
    let mut skipped = Vec::new();
    for (name, _, slot) in &entries {
        // The entry file itself: systemd-boot drops an entry without a `linux` line (an empty
        // file: a rename whose directory entry reached the disk before the file's size and
        // first cluster did).
        let path = format!("::/{}/{}", loader::ENTRIES_DIR, name.file_name());
        let text = capture(
            mtools(util::tool("mtype")?, disk)
                .arg(&path)
                .stderr(Stdio::null()),
        )
        .unwrap_or_default();
        if !text.lines().any(|l| l.starts_with("linux ")) {
            skipped.push(format!(
                "{} (ignored by the bootloader: {} bytes, no `linux` line)",
                name.file_name(),
                text.len()
            ));
            continue;
        }
        let check = slot_image(disk, *slot).and_then(|m| {
            let dir = loader::slot_dir(*slot);
            esp_file_matches(
                disk,
                &format!("{dir}/{}", loader::KERNEL_FILE),
                &m,
                "kernel",
            )?;
            esp_file_matches(
                disk,
                &format!("{dir}/{}", loader::INITRD_FILE),
                &m,
                "initrd",
            )?;
            Ok(m.version)
        });
        let detail = |seen: &str| {
            if skipped.is_empty() {
                format!("entries: {seen}")
            } else {
                format!("entries: {seen}; passed over: {}", skipped.join(", "))
            }
        };
        match check {
            Ok(version) => {
                if text != loader::slot_entry_text(*slot, &version) {
                    // A torn entry that still names a kernel: what it boots is the
                    // bootloader's business (booted first).
                    return Ok((
                        Verdict::Unknown,
                        format!(
                            "{} is torn ({:?}); {}",
                            name.file_name(),
                            text,
                            detail(&seen)
                        ),
                    ));
                }
                let v = match (*slot, version.as_str()) {
                    ('a', "1") => Verdict::Old,
                    ('b', "2") => Verdict::New,
                    _ => bail!(
                        "the bootloader boots {} = slot {slot} version {version}, neither the old nor the new image ({})",
                        name.file_name(),
                        detail(&seen)
                    ),
                };
                return Ok((v, format!("boots {}; {}", name.file_name(), detail(&seen))));
            }
            Err(e) => match name.counter {
                Some(c) if c.left > 0 => {
                    skipped.push(format!("{} (tries counted down: {e:#})", name.file_name()));
                }
                _ => bail!(
                    "the bootloader picks {} and it cannot boot ({e:#}); it has no tries to count down, so nothing falls back ({})",
                    name.file_name(),
                    detail(&seen)
                ),
            },
        }
    }
    bail!(
        "no bootable slot entry on the ESP (entries: {}; passed over: {})",
        if seen.is_empty() { "none" } else { &seen },
        skipped.join(", ")
    )
}

/// The rebuilt images of a state, in disk order.
pub struct Files {
    pub state: PathBuf,
    pub disk: PathBuf,
    pub vars: Option<PathBuf>,
}

impl Files {
    pub fn in_dir(dir: &Path, vars: bool) -> Files {
        Files {
            state: dir.join("state.crash.img"),
            disk: dir.join("disk.crash.img"),
            vars: vars.then(|| dir.join("vars.crash.fd")),
        }
    }

    pub fn outs(&self) -> Vec<&Path> {
        let mut v = vec![self.state.as_path(), self.disk.as_path()];
        v.extend(self.vars.as_deref());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(boot: &[&str]) -> StateView {
        let dump = tempfile::tempdir().unwrap();
        crate::e2e::write_seeded_state(dump.path()).unwrap();
        StateView {
            boot: boot.iter().map(|s| s.to_string()).collect(),
            next_mode: None,
            dump,
        }
    }

    fn empty(v: &StateView, t: &str) {
        let p = v.dump.path().join(t);
        std::fs::remove_dir_all(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
    }

    #[test]
    fn the_reset_states() {
        assert_eq!(wipe_state(&view(&[])).unwrap(), Verdict::Untouched);
        assert_eq!(
            wipe_state(&view(&["next_mode", "factory_wipe"])).unwrap(),
            Verdict::Pending
        );
        // Partly wiped with its journal and the request: recovery resumes.
        let v = view(&["factory_wipe", "factory_wipe.journal"]);
        empty(&v, "apps");
        assert_eq!(wipe_state(&v).unwrap(), Verdict::Pending);
        // Partly wiped, no request: nothing finishes it.
        let v = view(&[]);
        empty(&v, "apps");
        let e = wipe_state(&v).unwrap_err().to_string();
        assert!(e.contains("partly wiped"), "{e}");
        // All three empty, no request: done.
        for t in WIPED {
            empty(&v, t);
        }
        assert_eq!(wipe_state(&v).unwrap(), Verdict::Wiped);
        // A journal left behind without the request is not a finished wipe.
        let v2 = view(&["factory_wipe.journal"]);
        for t in WIPED {
            empty(&v2, t);
        }
        assert!(wipe_state(&v2).is_err());
    }

    #[test]
    fn a_torn_next_boot_record_fails() {
        let d = tempfile::tempdir().unwrap();
        let vars = d.path().join("vars.fd");
        std::fs::copy(nx_qemu::OVMF_VARS, &vars).unwrap();
        let mut v = view(&["next_mode"]);
        v.next_mode = Some(b"recovery\n".to_vec());
        assert_eq!(boot_record(&vars, &v).unwrap(), Verdict::Normal);
        nx_qemu::varstore::set_oneshot(&vars, Some("recovery.conf")).unwrap();
        assert_eq!(boot_record(&vars, &v).unwrap(), Verdict::Recovery);
        v.next_mode = Some(b"reco".to_vec());
        assert!(boot_record(&vars, &v).is_err());
    }
}

#[cfg(test)]
mod trust_tests {
    use super::*;

    fn seeded() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        crate::e2e::write_seeded_state(d.path()).unwrap();
        d
    }

    #[test]
    fn the_floor_may_only_rise_within_what_this_build_signs() {
        let d = seeded();
        let trust = d.path().join("trust");
        let floor = d.path().join(nx_contract::state::TRUST_FLOOR);
        trust_intact(&trust).unwrap();
        std::fs::write(&floor, "2\n").unwrap();
        trust_intact(&trust).unwrap();
        // A stale temp of the atomic writer beside it is not a change; anything else is.
        std::fs::write(trust.join(".security_version.tmp"), "3").unwrap();
        trust_intact(&trust).unwrap();
        std::fs::write(trust.join(".root.pub.tmp"), "x").unwrap();
        assert!(trust_intact(&trust).is_err());
        std::fs::remove_file(trust.join(".root.pub.tmp")).unwrap();
        for bad in ["0\n", "9\n", "2", "", "x\n"] {
            std::fs::write(&floor, bad).unwrap();
            assert!(trust_intact(&trust).is_err(), "{bad:?} accepted");
        }
        std::fs::write(&floor, "2\n").unwrap();
        std::fs::write(trust.join("root.pub"), b"changed").unwrap();
        assert!(trust_intact(&trust).is_err());
    }
}
