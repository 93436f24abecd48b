//! Console markers: every line a guest program prints on the console as part of the test
//! contract (`qemu/markers.toml`) is built by a constructor in this module, one submodule per
//! program. Code never formats a marker by hand; xtask and the runner match against the same
//! constructors (or the fixed prefixes a submodule declares for markers with variable parts,
//! all listed in [`PREFIXES`]). [`catalogue`] calls every constructor; the contract's tests
//! check `qemu/markers.toml` against it and that guest crates never format a marker by hand.

pub mod bootctld;
pub mod diag;
pub mod flashd;
pub mod init;
pub mod pid1;
pub mod rawrecv;
pub mod rebootd;
pub mod recovery;
pub mod recovery_sh;
pub mod reset;
pub mod selftest;

/// Every constructor of this module called with representative arguments, one sample each
/// (per submodule `samples()`). Used by the contract's tests: every marker that
/// `qemu/markers.toml` expects must be produced by one of these (or be a declared prefix).
pub fn catalogue() -> Vec<Marker> {
    let mut out = Vec::new();
    out.extend(init::samples());
    out.extend(pid1::samples());
    out.extend(recovery::samples());
    out.extend(recovery_sh::samples());
    out.extend(reset::samples());
    out.extend(selftest::samples());
    out.extend(diag::samples());
    out.extend(rawrecv::samples());
    out.extend(flashd::samples());
    out.extend(bootctld::samples());
    out.extend(rebootd::samples());
    out
}

/// The fixed prefixes the contract declares for markers with variable parts (what the runner
/// and xtask match against when they cannot know the whole line).
pub const PREFIXES: &[&str] = &[
    init::STATE_STUB_PREFIX,
    init::DEGRADED_PREFIX,
    init::NO_PARTITION_PREFIX,
    init::ERROR_PREFIX,
    init::ROOTFS_UNUSABLE_PREFIX,
    init::BOOTED_PREFIX,
    init::ROOTFS_VERITY_PREFIX,
    init::ROOTFS_MOUNT_TOOK_PREFIX,
    init::CONFIRMED_PREFIX,
    init::REBOOT_PREFIX,
    recovery::DIAG_WRITTEN_PREFIX,
    recovery::READY_PREFIX,
    recovery_sh::BUILTINS_PREFIX,
    recovery::STATE_STUB_PREFIX,
    rawrecv::READY_PREFIX,
    reset::WIPE_REMOVED_PREFIX,
    rawrecv::DONE_PREFIX,
    flashd::PATTERNS[0],
    flashd::PATTERNS[1],
    flashd::PATTERNS[2],
    flashd::PATTERNS[3],
    flashd::PATTERNS[4],
    flashd::PATTERNS[5],
    flashd::PATTERNS[6],
    flashd::PATTERNS[7],
    flashd::PATTERNS[8],
    init::FLOOR_PREFIX,
    flashd::LOG_PREFIX,
    bootctld::STUB_PREFIX,
    bootctld::BOOT_ATTEMPT_PREFIX,
];

/// Names joined with `", "` (how every marker lists names).
fn list<S: AsRef<str>>(names: &[S]) -> String {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    names.join(", ")
}

/// One console line (without the newline).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Marker(String);

impl Marker {
    /// Only constructors in this module build markers.
    pub(crate) fn new(line: impl Into<String>) -> Marker {
        Marker(line.into())
    }

    /// The line's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The line's text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for Marker {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Marker {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Marker {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Marker {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
