//! Where `nx` talks to a target: `--port SPEC` parsing and connecting.
//!
//! | SPEC                      | meaning                                                    |
//! |---------------------------|------------------------------------------------------------|
//! | `unix:PATH` or a bare path | a unix socket (QEMU `-chardev socket,path=…`)             |
//! | `tcp:HOST:PORT`           | a TCP socket (QEMU `-chardev socket,host=…,port=…`)       |
//! | `serial:/dev/ttyX[@BAUD]` | a real UART or a QEMU `pty` chardev (default 115200 baud)  |

pub use proto::ident::Daemon;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Default baud rate for `serial:` ports without `@BAUD`.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Why a `--port` value does not parse (the message says what to write instead).
#[derive(Debug, thiserror::Error)]
pub enum PortSpecError {
    #[error("empty port; use unix:PATH, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD]")]
    Empty,
    #[error("`unix:` needs a socket path, e.g. unix:build/qemu/flash.sock")]
    UnixNoPath,
    #[error("`{spec}`: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444")]
    Tcp { spec: String },
    #[error("`{spec}`: baud rate `{baud}` is not a number")]
    Baud {
        spec: String,
        baud: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("`serial:` needs a device, e.g. serial:/dev/ttyUSB0@115200")]
    SerialNoDevice,
    #[error(
        "unknown port kind `{scheme}:`; use unix:PATH, tcp:HOST:PORT or serial:/dev/ttyX[@BAUD]"
    )]
    UnknownKind { scheme: String },
}

/// Why a target could not be reached (the message says what to check).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "cannot connect to {spec}: no such file: is QEMU running? start it with `just recovery` \
         (or pass --port)"
    )]
    NoSuchFile { spec: String },
    #[error(
        "cannot connect to {spec}: it is not a socket ({kind}): --port wants the socket QEMU's \
         chardev listens on, e.g. unix:{example}"
    )]
    NotASocket {
        spec: String,
        kind: &'static str,
        example: String,
    },
    #[error(
        "cannot connect to {spec}: nobody listening (the socket file is left from a QEMU that \
         stopped): start the guest again with `just recovery`"
    )]
    NobodyListening { spec: String },
    #[error("this port is {found}, not {expected}: use {suggest} (--port was {spec})")]
    WrongDaemon {
        spec: String,
        /// What answered the probe.
        found: String,
        /// Who the command talks to.
        expected: Daemon,
        /// The socket to use instead.
        suggest: String,
    },
    #[error(
        "cannot connect to {spec}: is QEMU running? start it with `just recovery` (or pass --port)"
    )]
    Unix {
        spec: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {spec}: is the target listening?")]
    Tcp {
        spec: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {spec}: does the device exist and may you open it?")]
    Serial {
        spec: String,
        #[source]
        source: tokio_serial::Error,
    },
    /// Any other I/O failure while connecting (custom [`crate::send::Connector`]s).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A parsed `--port` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    Unix(PathBuf),
    Tcp(String),
    Serial { path: PathBuf, baud: u32 },
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<PortSpec, PortSpecError> {
        if s.is_empty() {
            return Err(PortSpecError::Empty);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(PortSpecError::UnixNoPath);
            }
            return Ok(PortSpec::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    return Ok(PortSpec::Tcp(addr.to_string()))
                }
                _ => {
                    return Err(PortSpecError::Tcp {
                        spec: s.to_string(),
                    })
                }
            }
        }
        if let Some(rest) = s.strip_prefix("serial:") {
            let (path, baud) = match rest.rsplit_once('@') {
                Some((p, b)) => (
                    p,
                    b.parse::<u32>().map_err(|source| PortSpecError::Baud {
                        spec: s.to_string(),
                        baud: b.to_string(),
                        source,
                    })?,
                ),
                None => (rest, DEFAULT_BAUD),
            };
            if path.is_empty() {
                return Err(PortSpecError::SerialNoDevice);
            }
            return Ok(PortSpec::Serial {
                path: path.into(),
                baud,
            });
        }
        if let Some((scheme, _)) = s.split_once(':') {
            if !scheme.contains('/') && !scheme.is_empty() {
                return Err(PortSpecError::UnknownKind {
                    scheme: scheme.to_string(),
                });
            }
        }
        Ok(PortSpec::Unix(s.into()))
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            PortSpec::Tcp(a) => write!(f, "tcp:{a}"),
            PortSpec::Serial { path, baud } => write!(f, "serial:{}@{baud}", path.display()),
        }
    }
}

/// A connected byte stream to a target.
pub trait Link: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Link for T {}

/// How long [`connect_to`] waits for the answer to its probe. A daemon answers at once; a
/// target that is still booting (nobody reads the port yet) does not, and the connection is
/// then used unidentified (the protocol's own timeouts apply).
pub const PROBE_WAIT: Duration = Duration::from_millis(800);

/// Why a unix socket `path` cannot be connected: no such file, not a socket, nobody
/// listening, or another error.
fn unix_error(spec: &PortSpec, path: &Path, source: std::io::Error) -> TransportError {
    use std::os::unix::fs::FileTypeExt as _;
    let spec_s = spec.to_string();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return TransportError::NoSuchFile { spec: spec_s }
        }
        Ok(m) if !m.file_type().is_socket() => {
            let kind = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket file"
            };
            return TransportError::NotASocket {
                spec: spec_s,
                kind,
                example: Daemon::Flashd.default_socket(),
            };
        }
        _ => {}
    }
    if source.kind() == std::io::ErrorKind::ConnectionRefused {
        return TransportError::NobodyListening { spec: spec_s };
    }
    TransportError::Unix {
        spec: spec_s,
        source,
    }
}

/// Connect to `spec` and check that `expected` answers there ([`proto::ident`]): another
/// daemon fails at once with [`TransportError::WrongDaemon`]. No answer within
/// [`PROBE_WAIT`] (a target still booting, a daemon that does not identify itself) is not an
/// error: the link is returned and the caller's protocol goes on.
pub async fn connect_to(
    spec: &PortSpec,
    expected: Daemon,
) -> Result<Box<dyn Link>, TransportError> {
    let mut link = connect(spec).await?;
    match identify(&mut link, PROBE_WAIT).await {
        Some(id) if id.daemon != Some(expected) => Err(TransportError::WrongDaemon {
            spec: spec.to_string(),
            found: id.name,
            expected,
            suggest: suggest_socket(spec, expected),
        }),
        _ => Ok(link),
    }
}

/// The socket of `daemon` next to `spec`'s (same run directory), or its default.
fn suggest_socket(spec: &PortSpec, daemon: Daemon) -> String {
    if let PortSpec::Unix(path) = spec {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            return dir.join(daemon.port().socket).display().to_string();
        }
    }
    daemon.default_socket()
}

/// Send the probe and wait up to `wait` for a reply; `None` when nothing (or nothing
/// understandable) came back. Bytes read before the reply are dropped: a daemon sends nothing
/// unasked, so they can only be stale output of an earlier connection.
pub async fn identify(link: &mut Box<dyn Link>, wait: Duration) -> Option<proto::ident::Ident> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    link.write_all(&proto::ident::probe()).await.ok()?;
    link.flush().await.ok()?;
    let read = async {
        let mut dec = proto::frame::FrameDecoder::new();
        let mut buf = bytes::BytesMut::with_capacity(256);
        let mut scratch = [0u8; 256];
        loop {
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        if let Some(id) = proto::ident::parse_reply(&f) {
                            return Some(id);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => continue,
                }
            }
            // Bounded: nothing but a short reply is expected.
            if buf.len() > 64 * 1024 {
                buf.clear();
            }
            match link.read(&mut scratch).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Connect to `spec`. The error says what to check ("is QEMU running? …").
pub async fn connect(spec: &PortSpec) -> Result<Box<dyn Link>, TransportError> {
    match spec {
        PortSpec::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| unix_error(spec, path, source))?;
            Ok(Box::new(stream))
        }
        PortSpec::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(|source| TransportError::Tcp {
                    spec: spec.to_string(),
                    source,
                })?;
            stream.set_nodelay(true).ok();
            Ok(Box::new(stream))
        }
        PortSpec::Serial { path, baud } => {
            use tokio_serial::SerialPortBuilderExt;
            let port = tokio_serial::new(path.to_string_lossy(), *baud)
                .open_native_async()
                .map_err(|source| TransportError::Serial {
                    spec: spec.to_string(),
                    source,
                })?;
            Ok(Box::new(port))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            "unix:/tmp/s".parse::<PortSpec>().unwrap(),
            PortSpec::Unix("/tmp/s".into())
        );
        assert_eq!(
            "build/qemu/flash.sock".parse::<PortSpec>().unwrap(),
            PortSpec::Unix("build/qemu/flash.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<PortSpec>().unwrap(),
            PortSpec::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "serial:/dev/ttyS1@9600".parse::<PortSpec>().unwrap(),
            PortSpec::Serial {
                path: "/dev/ttyS1".into(),
                baud: 9600
            }
        );
        assert_eq!(
            "serial:/dev/pts/3".parse::<PortSpec>().unwrap(),
            PortSpec::Serial {
                path: "/dev/pts/3".into(),
                baud: DEFAULT_BAUD
            }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_hint() {
        for bad in [
            "",
            "unix:",
            "tcp:nohost",
            "tcp::1",
            "tcp:h:notaport",
            "serial:",
            "serial:/dev/x@fast",
            "ftp:x",
        ] {
            let err = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(!err.is_empty(), "{bad}");
        }
        let err = "ftp:x".parse::<PortSpec>().unwrap_err().to_string();
        assert!(err.contains("unix:PATH"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for s in ["unix:/a/b", "tcp:localhost:1", "serial:/dev/ttyS0@115200"] {
            assert_eq!(s.parse::<PortSpec>().unwrap().to_string(), s);
        }
    }

    #[tokio::test]
    async fn missing_file_regular_file_and_dead_socket_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let dead = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        async fn msg(p: &Path) -> String {
            let spec = PortSpec::Unix(p.to_path_buf());
            crate::error_chain(&connect(&spec).await.err().unwrap())
        }
        let none = msg(&dir.path().join("none.sock")).await;
        assert!(none.contains("no such file"), "{none}");
        let plain = msg(&file).await;
        assert!(plain.contains("not a socket (a regular file)"), "{plain}");
        let gone = msg(&dead).await;
        assert!(gone.contains("nobody listening"), "{gone}");
    }

    #[tokio::test]
    async fn a_silent_peer_is_used_unidentified_and_a_wrong_one_is_named() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let silent = dir.path().join("silent.sock");
        let l = tokio::net::UnixListener::bind(&silent).unwrap();
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            drop(s);
        });
        let t = std::time::Instant::now();
        let spec = PortSpec::Unix(silent.clone());
        assert!(connect_to(&spec, Daemon::Flashd).await.is_ok());
        assert!(t.elapsed() >= PROBE_WAIT);
        hold.abort();

        let other = dir.path().join("x").join("reboot.sock");
        std::fs::create_dir(other.parent().unwrap()).unwrap();
        let l = tokio::net::UnixListener::bind(&other).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(b"stale bytes of an old session").await.unwrap();
            s.write_all(&proto::ident::reply(Daemon::Rebootd))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        });
        let spec = PortSpec::Unix(other.clone());
        let err = connect_to(&spec, Daemon::Flashd)
            .await
            .err()
            .unwrap()
            .to_string();
        let want = format!(
            "this port is rebootd, not flashd: use {}",
            other.with_file_name("flash.sock").display()
        );
        assert!(err.contains(&want), "{err}");
    }

    #[tokio::test]
    async fn connect_error_names_the_port_and_the_fix() {
        let spec: PortSpec = "unix:/nonexistent/flash.sock".parse().unwrap();
        let err = crate::error_chain(&connect(&spec).await.err().unwrap());
        assert!(err.contains("unix:/nonexistent/flash.sock"), "{err}");
        assert!(err.contains("just recovery"), "{err}");
    }
}
