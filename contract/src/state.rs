//! The `/state` disk layout. Paths are relative to the mount point unless named `*_MOUNT`.

/// Mount point of the state disk in the guest.
pub const STATE_MOUNT: &str = "/state";
/// ext4 label of the state disk.
pub const STATE_LABEL: &str = "state";
/// Top-level directories of `/state`.
pub const STATE_DIRS: [&str; 8] = [
    "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
];
/// The one-shot next-boot record (rebootd writes it; the booted init consumes it).
pub const NEXT_MODE: &str = "boot/next_mode";
/// Largest next-boot record a reader accepts.
pub const MAX_NEXT_MODE: usize = 64;
/// A factory-wipe request (rebootd writes it; recovery performs it).
pub const FACTORY_WIPE: &str = "boot/factory_wipe";
/// The journal of a wipe in progress.
pub const FACTORY_WIPE_JOURNAL: &str = "boot/factory_wipe.journal";
/// bootctld's canonical snapshot.
pub const BOOTCTL_SNAPSHOT: &str = "bootctl/state.nxs";
/// Where bootctld moves a snapshot it cannot decode.
pub const BOOTCTL_SNAPSHOT_CORRUPT: &str = "bootctl/state.nxs.corrupt";
/// flashd's directory.
pub const FLASH_DIR: &str = "flash";
/// flashd's staging file (non-direct transfers).
pub const FLASH_STAGING: &str = "flash/staging.img";
/// Names the slot device while a direct transfer streams into it.
pub const FLASH_STAGING_WHERE: &str = "flash/staging.where";
/// flashd's resume journal (durable progress of the transfer).
pub const FLASH_JOURNAL: &str = "flash/journal.json";
/// What is installed right now (flashd's install record, for skip / short-circuit).
pub const FLASH_INSTALLED: &str = "flash/installed.json";
/// The skip index of the installed image (kept beside the install record).
pub const FLASH_INDEX: &str = "flash/index.json";
/// The receipt counters of the transfer in progress (informational).
pub const FLASH_COUNTERS: &str = "flash/counters.json";
/// The receipt of the last install.
pub const FLASH_LAST_INSTALL: &str = "flash/last-install.json";
/// Trusted keys and the anti-rollback floor (kept by a factory reset).
pub const TRUST_DIR: &str = "trust";
/// Release keys the device trusts: one `<name>.pub` per key (`nexus-ed25519-public-v1 …`).
/// Two at once is how a key is rotated.
pub const TRUST_KEYS: &str = "trust/keys";
/// Development keys: trusted like release keys, and `--allow-downgrade` is honoured for the
/// images they sign.
pub const TRUST_DEV_KEYS: &str = "trust/dev-keys";
/// The anti-rollback floor: the highest `security_version` of a confirmed slot (decimal).
pub const TRUST_FLOOR: &str = "trust/security_version";
