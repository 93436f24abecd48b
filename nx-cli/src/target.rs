//! Which target a verb talks to when `--port` is not given: the one place every verb's default
//! port comes from.
//!
//! Precedence, per daemon (flashd, rebootd, bootctld):
//!
//! 1. `--port` on the command line (clap: the default below is only used without it);
//! 2. the environment: `NX_PORT` (flashd's port only) or `NX_DEVICE` (a guest's run directory,
//!    holding `flash.sock`, `reboot.sock` and `bootctl.sock`, as `nx devices` lists them);
//! 3. `nx.toml` at the project root: `port`, `reboot_port`, `bootctl_port` (port SPECs) and
//!    `device` (a run directory), the same meanings as above;
//! 4. the standard guest's sockets: `<root>/build/qemu/<socket>`.
//!
//! Relative paths (in `NX_DEVICE`, `nx.toml`, and the default) are resolved against the
//! **project root**: the nearest directory, walking up from the current directory, that holds
//! `nx.toml`, or a `Cargo.toml` with a `[workspace]` table, or a `build/qemu` directory. Outside
//! any project they stay relative to the current directory.

use nx_contract::ports;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The config file at the project root.
pub const CONFIG_FILE: &str = "nx.toml";
/// Environment variable: flashd's port SPEC.
pub const ENV_PORT: &str = "NX_PORT";
/// Environment variable: a guest run directory (or a socket path inside one).
pub const ENV_DEVICE: &str = "NX_DEVICE";
/// Largest `nx.toml` read.
const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// The guest daemons a port can lead to (one definition, shared with the identification
/// probe).
pub use proto::ident::Daemon;

/// `nx.toml`: every field optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A guest run directory holding the three sockets.
    pub device: Option<String>,
    /// flashd's port SPEC.
    pub port: Option<String>,
    /// rebootd's port SPEC.
    pub reboot_port: Option<String>,
    /// bootctld's port SPEC.
    pub bootctl_port: Option<String>,
}

/// Why `nx.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not a valid nx.toml (keys: device, port, reboot_port, bootctl_port)")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// What the resolution looks at, gathered once (tests build it by hand).
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// The project root, if one was found.
    pub root: Option<PathBuf>,
    /// `NX_PORT`.
    pub env_port: Option<String>,
    /// `NX_DEVICE`.
    pub env_device: Option<String>,
    /// `nx.toml` at the root.
    pub file: FileConfig,
}

/// The nearest directory from `start` upwards that is a project root (see the module doc).
pub fn find_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| is_root(d))
        .map(Path::to_path_buf)
}

fn is_root(dir: &Path) -> bool {
    if dir.join(CONFIG_FILE).is_file() || dir.join(ports::HOST_RUN_DIR).is_dir() {
        return true;
    }
    let cargo = dir.join("Cargo.toml");
    match std::fs::metadata(&cargo) {
        Ok(m) if m.is_file() && m.len() <= MAX_CONFIG_LEN => std::fs::read_to_string(&cargo)
            .map(|t| t.lines().any(|l| l.trim() == "[workspace]"))
            .unwrap_or(false),
        _ => false,
    }
}

/// Read `nx.toml` in `root` (absent: empty).
pub fn read_config(root: &Path) -> Result<FileConfig, ConfigError> {
    let path = root.join(CONFIG_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    if meta.len() > MAX_CONFIG_LEN {
        return Err(ConfigError::TooLarge {
            path,
            max: MAX_CONFIG_LEN,
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
}

impl Inputs {
    /// Gather from the current directory and the environment. A broken `nx.toml` is reported
    /// on stderr and ignored (the defaults are used), so `--help` still works.
    pub fn from_env() -> Inputs {
        let root = std::env::current_dir().ok().and_then(|d| find_root(&d));
        let file = match &root {
            Some(r) => read_config(r).unwrap_or_else(|e| {
                eprintln!(
                    "nx: warning: {}; using the default ports",
                    anyhow::Error::from(e)
                        .chain()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(": ")
                );
                FileConfig::default()
            }),
            None => FileConfig::default(),
        };
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Inputs {
            root,
            env_port: var(ENV_PORT),
            env_device: var(ENV_DEVICE),
            file,
        }
    }

    /// A path made absolute against the project root (unchanged when absolute or no root).
    pub fn at_root(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        match &self.root {
            Some(r) if p.is_relative() => r.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// A port SPEC with a relative unix path (`unix:PATH` or a bare path) resolved against
    /// the root; other SPECs (`tcp:`, `serial:`) unchanged.
    pub fn spec_at_root(&self, spec: &str) -> String {
        let spec = spec.trim();
        if let Some(path) = spec.strip_prefix("unix:") {
            return format!("unix:{}", self.at_root(path).display());
        }
        if spec.starts_with("tcp:") || spec.starts_with("serial:") {
            return spec.to_string();
        }
        format!("unix:{}", self.at_root(spec).display())
    }

    /// The socket of `daemon` in the run directory `dev`.
    fn in_device(&self, dev: &str, daemon: Daemon) -> String {
        let dir = self.at_root(dev);
        // NX_DEVICE may name a socket inside the run directory: use its directory.
        let dir = if dir.extension().is_some_and(|e| e == "sock") {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir)
        } else {
            dir
        };
        format!("unix:{}", dir.join(daemon.port().socket).display())
    }

    /// The port SPEC of `daemon` when no `--port` is given.
    pub fn resolve(&self, daemon: Daemon) -> String {
        if daemon == Daemon::Flashd {
            if let Some(p) = &self.env_port {
                return self.spec_at_root(p);
            }
        }
        if let Some(d) = &self.env_device {
            return self.in_device(d, daemon);
        }
        let file_port = match daemon {
            Daemon::Flashd => &self.file.port,
            Daemon::Rebootd => &self.file.reboot_port,
            Daemon::Bootctld => &self.file.bootctl_port,
        };
        if let Some(p) = file_port {
            return self.spec_at_root(p);
        }
        if let Some(d) = &self.file.device {
            return self.in_device(d, daemon);
        }
        self.in_device(ports::HOST_RUN_DIR, daemon)
    }
}

struct Resolved {
    inputs: Inputs,
    flashd: String,
    rebootd: String,
    bootctld: String,
}

fn resolved() -> &'static Resolved {
    static R: OnceLock<Resolved> = OnceLock::new();
    R.get_or_init(|| {
        let inputs = Inputs::from_env();
        Resolved {
            flashd: inputs.resolve(Daemon::Flashd),
            rebootd: inputs.resolve(Daemon::Rebootd),
            bootctld: inputs.resolve(Daemon::Bootctld),
            inputs,
        }
    })
}

/// This process's default port SPEC of `daemon` (resolved once; see the module doc).
pub fn default_port(daemon: Daemon) -> &'static str {
    let r = resolved();
    match daemon {
        Daemon::Flashd => &r.flashd,
        Daemon::Rebootd => &r.rebootd,
        Daemon::Bootctld => &r.bootctld,
    }
}

/// This process's resolution inputs (project root, environment, nx.toml).
pub fn inputs() -> &'static Inputs {
    &resolved().inputs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(root: &str) -> Inputs {
        Inputs {
            root: Some(PathBuf::from(root)),
            ..Inputs::default()
        }
    }

    #[test]
    fn default_is_build_qemu_under_the_root() {
        let i = inputs("/p");
        assert_eq!(i.resolve(Daemon::Flashd), "unix:/p/build/qemu/flash.sock");
        assert_eq!(i.resolve(Daemon::Rebootd), "unix:/p/build/qemu/reboot.sock");
        assert_eq!(
            i.resolve(Daemon::Bootctld),
            "unix:/p/build/qemu/bootctl.sock"
        );
        // No root: relative to the current directory, as before.
        let none = Inputs::default();
        assert_eq!(none.resolve(Daemon::Flashd), "unix:build/qemu/flash.sock");
    }

    #[test]
    fn precedence_env_over_file_over_default() {
        let mut i = inputs("/p");
        i.file = FileConfig {
            device: Some("build/e2e/x/qemu".into()),
            port: Some("tcp:127.0.0.1:7000".into()),
            reboot_port: None,
            bootctl_port: Some("/abs/b.sock".into()),
        };
        // nx.toml: the daemon's own key beats `device`.
        assert_eq!(i.resolve(Daemon::Flashd), "tcp:127.0.0.1:7000");
        assert_eq!(i.resolve(Daemon::Bootctld), "unix:/abs/b.sock");
        assert_eq!(
            i.resolve(Daemon::Rebootd),
            "unix:/p/build/e2e/x/qemu/reboot.sock"
        );
        // NX_DEVICE beats nx.toml for every daemon.
        i.env_device = Some("/run/g1".into());
        assert_eq!(i.resolve(Daemon::Flashd), "unix:/run/g1/flash.sock");
        assert_eq!(i.resolve(Daemon::Bootctld), "unix:/run/g1/bootctl.sock");
        // A socket path in NX_DEVICE names its directory.
        i.env_device = Some("/run/g1/reboot.sock".into());
        assert_eq!(i.resolve(Daemon::Flashd), "unix:/run/g1/flash.sock");
        // NX_PORT beats NX_DEVICE, for flashd only; relative paths resolve against the root.
        i.env_port = Some("unix:x/f.sock".into());
        assert_eq!(i.resolve(Daemon::Flashd), "unix:/p/x/f.sock");
        assert_eq!(i.resolve(Daemon::Rebootd), "unix:/run/g1/reboot.sock");
        i.env_port = Some("serial:/dev/ttyS1@115200".into());
        assert_eq!(i.resolve(Daemon::Flashd), "serial:/dev/ttyS1@115200");
    }

    #[test]
    fn root_is_found_walking_up() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(find_root(&deep), None);
        // A workspace Cargo.toml marks the root; a crate's Cargo.toml does not.
        std::fs::write(t.path().join("a/Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        assert_eq!(find_root(&deep), None);
        std::fs::write(t.path().join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
        assert_eq!(find_root(&deep).as_deref(), Some(t.path()));
        // build/qemu marks it too, and the nearest root wins.
        std::fs::create_dir_all(t.path().join("a/b/build/qemu")).unwrap();
        assert_eq!(find_root(&deep), Some(t.path().join("a/b")));
        // nx.toml, nearer still.
        std::fs::write(deep.join(CONFIG_FILE), "").unwrap();
        assert_eq!(find_root(&deep), Some(deep.clone()));
    }

    #[test]
    fn config_file_parses_and_rejects() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read_config(t.path()).unwrap(), FileConfig::default());
        std::fs::write(
            t.path().join(CONFIG_FILE),
            "device = \"build/qemu\"\nport = \"tcp:h:1\"\n",
        )
        .unwrap();
        let c = read_config(t.path()).unwrap();
        assert_eq!(c.device.as_deref(), Some("build/qemu"));
        assert_eq!(c.port.as_deref(), Some("tcp:h:1"));
        std::fs::write(t.path().join(CONFIG_FILE), "prot = \"typo\"\n").unwrap();
        assert!(matches!(
            read_config(t.path()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
