//! Where `nx` talks to a target: `--port SPEC` parsing and connecting.
//!
//! | SPEC                      | meaning                                                    |
//! |---------------------------|------------------------------------------------------------|
//! | `unix:PATH` or a bare path | a unix socket (QEMU `-chardev socket,path=…`)             |
//! | `tcp:HOST:PORT`           | a TCP socket (QEMU `-chardev socket,host=…,port=…`)       |
//! | `serial:/dev/ttyX[@BAUD]` | a real UART or a QEMU `pty` chardev (default 115200 baud)  |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
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

/// Connect to `spec`. The error says what to check ("is QEMU running? …").
pub async fn connect(spec: &PortSpec) -> Result<Box<dyn Link>, TransportError> {
    match spec {
        PortSpec::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| TransportError::Unix {
                    spec: spec.to_string(),
                    source,
                })?;
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
    async fn connect_error_names_the_port_and_the_fix() {
        let spec: PortSpec = "unix:/nonexistent/flash.sock".parse().unwrap();
        let err = crate::error_chain(&connect(&spec).await.err().unwrap());
        assert!(err.contains("unix:/nonexistent/flash.sock"), "{err}");
        assert!(err.contains("just recovery"), "{err}");
    }
}
