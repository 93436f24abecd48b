//! The host-tools table: every external program that any recipe, test or helper of this
//! workspace spawns, with the Debian package that ships it.
//!
//! Every `cargo xtask` recipe installs the packages of the missing programs first (as root;
//! otherwise it prints the exact `apt-get install` line), so a fresh machine needs nothing
//! installed by hand. The hygiene test at the bottom keeps the table honest: it scans the
//! workspace for spawned programs (`Command::new("…")`, `tool("…")`, `find_tool("…")`,
//! `which("…")`, capnpc's `CompilerCommand`) and fails when one is neither listed here nor a
//! binary the workspace builds.
//!
//! Architecture invariant: every program the workspace spawns is in [`HOST_TOOLS`] or built by
//! the workspace.

/// A host program and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The executable's name.
    pub bin: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
    /// Who spawns it (for the reader of this table).
    pub used_by: &'static str,
}

/// Everything the recipes and tests spawn on the host.
pub const HOST_TOOLS: &[Tool] = &[
    Tool {
        bin: "qemu-system-x86_64",
        package: "qemu-system-x86",
        used_by: "the runner: marker profiles, e2e, demo, bench",
    },
    Tool {
        bin: "mkfs.ext4",
        package: "e2fsprogs",
        used_by: "xtask guest: state/slot disks",
    },
    Tool {
        bin: "debugfs",
        package: "e2fsprogs",
        used_by: "reading /state offline in e2e checks",
    },
    Tool {
        bin: "e2fsck",
        package: "e2fsprogs",
        used_by: "e2e: the state disk stays clean",
    },
    Tool {
        bin: "sfdisk",
        package: "fdisk",
        used_by: "xtask guest: the GPT slot disk",
    },
    Tool {
        bin: "capnp",
        package: "capnproto",
        used_by: "xtask codegen and bootctld_host's codegen_fresh test",
    },
    Tool {
        bin: "dpkg",
        package: "dpkg",
        used_by: "xtask guest: unpacking the kernel .deb",
    },
    Tool {
        bin: "dpkg-deb",
        package: "dpkg",
        used_by: "xtask guest: kernel package contents",
    },
    Tool {
        bin: "apt-get",
        package: "apt",
        used_by: "installing these packages; kernel download",
    },
    Tool {
        bin: "apt-cache",
        package: "apt",
        used_by: "finding the newest cloud kernel",
    },
    Tool {
        bin: "cp",
        package: "coreutils",
        used_by: "e2e: copying disk images",
    },
    Tool {
        bin: "date",
        package: "coreutils",
        used_by: "bench: the report's time stamp",
    },
    Tool {
        bin: "kill",
        package: "procps",
        used_by: "nx-cli tests: Ctrl-C (SIGINT) to nx",
    },
    Tool {
        bin: "bash",
        package: "bash",
        used_by: "nx-cli tests: `bash -n` on the completion script",
    },
    Tool {
        bin: "sh",
        package: "dash",
        used_by: "xtask e2e quickstart: runs each README tour line as a shell command",
    },
    Tool {
        bin: "script",
        package: "bsdutils",
        used_by: "nx-cli test output_cli: a pseudo-terminal for TERM=dumb progress",
    },
    Tool {
        bin: "mkfs.vfat",
        package: "dosfstools",
        used_by: "xtask guest: the EFI system partition",
    },
    Tool {
        bin: "mmd",
        package: "mtools",
        used_by: "xtask guest: directories on the ESP",
    },
    Tool {
        bin: "mcopy",
        package: "mtools",
        used_by: "xtask guest: files on the ESP; xtask crash: boot files read back offline",
    },
    Tool {
        bin: "mdir",
        package: "mtools",
        used_by: "xtask crash: the ESP's boot entries of a crash state, read offline",
    },
    Tool {
        bin: "mtype",
        package: "mtools",
        used_by:
            "xtask's ESP test: reading files back from the ESP; xtask crash: entry files offline",
    },
    Tool {
        bin: "veritysetup",
        package: "cryptsetup-bin",
        used_by: "nx-cli test image_verity: the reference dm-verity hash tree",
    },
    Tool {
        bin: "tar",
        package: "tar",
        used_by: "xtask bench delta: the uncompressed trees of the delta references",
    },
    Tool {
        bin: "zstd",
        package: "zstd",
        used_by: "xtask bench delta: the zstd --patch-from reference",
    },
    Tool {
        bin: "casync",
        package: "casync",
        used_by: "xtask bench delta: the content-defined chunk store reference",
    },
    Tool {
        bin: "xdelta3",
        package: "xdelta3",
        used_by: "xtask bench delta: the binary-delta reference",
    },
    Tool {
        bin: "qemu-io",
        package: "qemu-utils",
        used_by: "crash simulator test: QEMU's NBD client",
    },
];

/// Debian's systemd-boot (package `systemd-boot-efi`).
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
pub use nx_qemu::{OVMF_CODE, OVMF_VARS};

/// Files (not programs) the recipes read from Debian packages, by absolute path.
pub const HOST_FILES: &[Tool] = &[
    Tool {
        bin: SYSTEMD_BOOT_EFI,
        package: "systemd-boot-efi",
        used_by: "xtask guest: the boot loader on the ESP",
    },
    Tool {
        bin: OVMF_CODE,
        package: "ovmf",
        used_by: "booting build/disk.img with UEFI firmware (docs/runner/boot.md)",
    },
    Tool {
        bin: OVMF_VARS,
        package: "ovmf",
        used_by: "the template of a device's EFI variable store",
    },
];

/// The Debian package of `bin` (a program or one of the files), if it is in the tables.
pub fn package_of(bin: &str) -> Option<&'static str> {
    HOST_TOOLS
        .iter()
        .chain(HOST_FILES)
        .find(|t| t.bin == bin)
        .map(|t| t.package)
}

/// The distinct Debian packages of both tables, sorted.
pub fn packages() -> Vec<&'static str> {
    let mut p: Vec<&str> = HOST_TOOLS
        .iter()
        .chain(HOST_FILES)
        .map(|t| t.package)
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    /// Every `.rs` file and `Cargo.toml` of the workspace (not target/, build/, .git).
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                if !matches!(name.as_str(), "target" | "build" | ".git" | "node_modules")
                    && !name.starts_with('.')
                {
                    files(&p, out);
                }
            } else if name.ends_with(".rs") || name == "Cargo.toml" {
                out.push(p);
            }
        }
    }

    /// The string literal right after each occurrence of `needle` (`needle` ends with `("`).
    fn literals_after<'a>(src: &'a str, needle: &str) -> Vec<&'a str> {
        let mut v = Vec::new();
        let mut rest = src;
        while let Some(i) = rest.find(needle) {
            // `find_tool(` contains `tool(`: only count whole identifiers.
            let before = rest[..i].chars().next_back();
            let after = &rest[i + needle.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(end) = after.find('"') {
                v.push(&after[..end]);
            }
        }
        v
    }

    /// The programs a source file spawns, by the patterns the workspace uses (comment lines
    /// are not code).
    fn spawned(src: &str) -> BTreeSet<String> {
        let code: String = src
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let src = code.as_str();
        let mut out = BTreeSet::new();
        // A file that imports clap's `Command` builds argument parsers with `Command::new`:
        // only fully qualified process commands count there.
        let clap_command = src.contains("clap::Command")
            || src
                .match_indices("use clap::{")
                .any(|(i, _)| src[i..].split('}').next().unwrap_or("").contains("Command"));
        let command_needles: &[&str] = if clap_command {
            &["process::Command::new(\""]
        } else {
            &["Command::new(\""]
        };
        for needle in
            command_needles
                .iter()
                .chain(&["tool(\"", "find_tool(\"", "which(\"", "first_line(\""])
        {
            for lit in literals_after(src, needle) {
                out.insert(lit.to_string());
            }
        }
        if src.contains("CompilerCommand::new") {
            out.insert("capnp".to_string());
        }
        out
    }

    /// Binaries the workspace builds: `[[bin]]` names and packages with a `src/main.rs`.
    fn workspace_bins(manifests: &[PathBuf]) -> BTreeSet<String> {
        let mut bins = BTreeSet::new();
        for m in manifests {
            let doc: toml::Value = toml::from_str(&std::fs::read_to_string(m).unwrap()).unwrap();
            if let Some(arr) = doc.get("bin").and_then(|b| b.as_array()) {
                for b in arr {
                    if let Some(n) = b.get("name").and_then(|n| n.as_str()) {
                        bins.insert(n.to_string());
                    }
                }
            }
            let pkg = doc
                .get("package")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str());
            if let (Some(pkg), Some(dir)) = (pkg, m.parent()) {
                if dir.join("src/main.rs").is_file() {
                    bins.insert(pkg.to_string());
                }
            }
        }
        bins
    }

    /// Every program spawned anywhere, with the files that spawn it.
    fn scan() -> (Vec<(String, PathBuf)>, BTreeSet<String>) {
        let mut all = Vec::new();
        files(&root(), &mut all);
        let (manifests, sources): (Vec<PathBuf>, Vec<PathBuf>) =
            all.into_iter().partition(|p| p.ends_with("Cargo.toml"));
        let mut found = Vec::new();
        for f in &sources {
            let src = std::fs::read_to_string(f).unwrap();
            for prog in spawned(&src) {
                found.push((prog, f.clone()));
            }
        }
        (found, workspace_bins(&manifests))
    }

    fn unlisted(found: &[(String, PathBuf)], bins: &BTreeSet<String>) -> Vec<String> {
        found
            .iter()
            .filter(|(p, _)| package_of(p).is_none() && !bins.contains(p))
            .map(|(p, f)| format!("`{p}` spawned in {}", f.display()))
            .collect()
    }

    #[test]
    fn every_spawned_program_is_in_the_table_or_built_here() {
        let (found, bins) = scan();
        // The scan must see what we know is there, or it proves nothing.
        for known in [
            "qemu-system-x86_64",
            "debugfs",
            "capnp",
            "sfdisk",
            "mkfs.ext4",
        ] {
            assert!(
                found.iter().any(|(p, _)| p == known),
                "the scan no longer finds `{known}`: fix the patterns"
            );
        }
        assert!(bins.contains("nx") && bins.contains("flashd"), "{bins:?}");
        let bad = unlisted(&found, &bins);
        assert!(
            bad.is_empty(),
            "programs spawned but not in xtask/src/host_tools.rs HOST_TOOLS (add each with its \
             Debian package, so `cargo xtask …` installs it on a fresh machine):\n  {}",
            bad.join("\n  ")
        );
    }

    #[test]
    fn the_scan_catches_a_new_program() {
        let src = "fn f() { std::process::Command::new(\"some-tool\").status(); }\n\
                   fn g() { let p = util::tool(\"other-tool\"); let q = find_tool(\"debugfs\"); }";
        let found: Vec<(String, PathBuf)> = spawned(src)
            .into_iter()
            .map(|p| (p, PathBuf::from("x.rs")))
            .collect();
        let bad = unlisted(&found, &BTreeSet::new());
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].contains("other-tool") && bad[1].contains("some-tool"));
        // clap's Command is not a process.
        let clap = "use clap::{Arg, Command};\nfn c() { Command::new(\"nx\"); }";
        assert!(spawned(clap).is_empty());
    }

    #[test]
    fn readme_names_every_package() {
        let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
        let line = readme
            .lines()
            .find(|l| l.contains("Debian packages"))
            .expect("README.md has no line naming the Debian packages the set-up installs");
        for p in packages() {
            assert!(
                line.contains(&format!("`{p}`")),
                "README's Debian packages line misses `{p}`: {line}"
            );
        }
    }

    #[test]
    fn no_duplicate_binaries() {
        let mut seen = BTreeSet::new();
        for t in HOST_TOOLS.iter().chain(HOST_FILES) {
            assert!(seen.insert(t.bin), "{} listed twice", t.bin);
        }
    }
}
