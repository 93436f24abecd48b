//! "Who are you?" — the identification every guest daemon answers before its own protocol.
//!
//! Every host connection (`nx flash …` to flashd, `nx boot …` to bootctld, `nx reset`,
//! `nx recovery`, `nx flash reboot` to rebootd) starts with a probe; the daemon answers with its
//! name and protocol version, so a client at the wrong port fails at once ("this port is
//! rebootd, not flashd") instead of timing out in a protocol the other side does not speak.
//!
//! Both are ordinary [`crate::frame`] frames, so every daemon already finds them in its input
//! stream at any point (magic + CRC resynchronisation) — also on a virtio-serial port, where
//! the guest sees no connection boundaries:
//!
//! ```text
//! probe:  frame.msg_type = PROBE (0x49, 'I')  flags 0  seq 0  payload = PROBE_PAYLOAD ("nx-ident 1")
//! reply:  frame.msg_type = REPLY (0x69, 'i')  flags 0  seq 0  payload = "<daemon> <version>" (ASCII)
//! ```
//!
//! `<daemon>` is one of [`Daemon`]'s names (`flashd`, `rebootd`, `bootctld`), `<version>` the
//! decimal protocol version it speaks on that port ([`Daemon::protocol_version`]). A daemon
//! answers every probe (also in the middle of a session: the probe is not part of it) and
//! never sends a reply unasked. A client that sends its protocol's first frame directly (an
//! old `nx`) is served as before: the probe is optional for daemons' peers.

use crate::frame::Frame;
use bytes::Bytes;

/// `msg_type` of the client's probe.
pub const PROBE: u8 = 0x49;
/// `msg_type` of the daemon's reply.
pub const REPLY: u8 = 0x69;
/// The probe's payload (the identification scheme's version is its last word).
pub const PROBE_PAYLOAD: &[u8] = b"nx-ident 1";
/// Longest reply payload accepted (a client reads nothing bigger).
pub const MAX_REPLY: usize = 64;
/// Version of the framed Cap'n Proto link (`crate::rpc::link`) rebootd and bootctld speak.
pub const RPC_LINK_VERSION: u8 = 1;

/// A guest daemon with a host port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// The flashing daemon (flash protocol, `docs/provisioning/protocol.md`).
    Flashd,
    /// The next-boot authority (capnp-rpc over `crate::rpc::link`).
    Rebootd,
    /// The slot-state authority (capnp-rpc over `crate::rpc::link`).
    Bootctld,
}

impl Daemon {
    /// Every daemon.
    pub const ALL: [Daemon; 3] = [Daemon::Flashd, Daemon::Rebootd, Daemon::Bootctld];

    /// Its name (what the reply carries, what logs use).
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Flashd => "flashd",
            Daemon::Rebootd => "rebootd",
            Daemon::Bootctld => "bootctld",
        }
    }

    /// The daemon called `name`.
    pub fn from_name(name: &str) -> Option<Daemon> {
        Daemon::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The protocol version it speaks on its port.
    pub fn protocol_version(self) -> u8 {
        match self {
            Daemon::Flashd => crate::msg::PROTO_VERSION,
            Daemon::Rebootd | Daemon::Bootctld => RPC_LINK_VERSION,
        }
    }

    /// Its virtio-serial port (name and host socket file).
    pub fn port(self) -> nx_contract::ports::PortSpec {
        match self {
            Daemon::Flashd => nx_contract::ports::FLASH,
            Daemon::Rebootd => nx_contract::ports::REBOOT,
            Daemon::Bootctld => nx_contract::ports::BOOTCTL,
        }
    }

    /// Its host socket in the standard run directory (`build/qemu/flash.sock`).
    pub fn default_socket(self) -> String {
        format!(
            "{}/{}",
            nx_contract::ports::HOST_RUN_DIR,
            self.port().socket
        )
    }
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a daemon said it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    /// The daemon, or `None` for a name this build does not know.
    pub daemon: Option<Daemon>,
    /// The name as sent.
    pub name: String,
    /// The protocol version it speaks.
    pub version: u8,
}

/// The probe frame, encoded.
pub fn probe() -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(f) = Frame::new(PROBE, 0, 0, Bytes::from_static(PROBE_PAYLOAD)) {
        f.encode_to_vec(&mut out);
    }
    out
}

/// Whether `frame` is a probe.
pub fn is_probe(frame: &Frame) -> bool {
    frame.msg_type() == PROBE
}

/// `daemon`'s reply frame, encoded.
pub fn reply(daemon: Daemon) -> Vec<u8> {
    let text = format!("{} {}", daemon.name(), daemon.protocol_version());
    let mut out = Vec::new();
    if let Ok(f) = Frame::new(REPLY, 0, 0, Bytes::from(text.into_bytes())) {
        f.encode_to_vec(&mut out);
    }
    out
}

/// `daemon`'s reply as a [`Frame`] (for daemons that send frames).
pub fn reply_frame(daemon: Daemon) -> Option<Frame> {
    let text = format!("{} {}", daemon.name(), daemon.protocol_version());
    Frame::new(REPLY, 0, 0, Bytes::from(text.into_bytes())).ok()
}

/// The identification in a reply frame; `None` if `frame` is not a well-formed reply.
pub fn parse_reply(frame: &Frame) -> Option<Ident> {
    if frame.msg_type() != REPLY || frame.payload().len() > MAX_REPLY {
        return None;
    }
    let text = std::str::from_utf8(frame.payload()).ok()?;
    let (name, version) = text.split_once(' ')?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    Some(Ident {
        daemon: Daemon::from_name(name),
        name: name.to_string(),
        version: version.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use bytes::BytesMut;

    fn decode(wire: &[u8]) -> Frame {
        let mut buf = BytesMut::from(wire);
        FrameDecoder::new().decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn probe_and_reply_round_trip() {
        assert!(is_probe(&decode(&probe())));
        for d in Daemon::ALL {
            let id = parse_reply(&decode(&reply(d))).unwrap();
            assert_eq!(id.daemon, Some(d));
            assert_eq!(id.version, d.protocol_version());
            assert_eq!(Some(decode(&reply(d))), reply_frame(d));
        }
        assert!(parse_reply(&decode(&probe())).is_none());
    }

    #[test]
    fn types_do_not_collide_with_the_protocols() {
        for t in [PROBE, REPLY] {
            assert!(crate::msg::MsgType::from_u8(t).is_none(), "{t:#x}");
            assert_ne!(t, crate::rpc::link::RPC_DATA);
            assert_ne!(t, crate::rpc::link::RPC_RESET);
        }
    }

    #[test]
    fn names_and_sockets() {
        assert_eq!(Daemon::Flashd.default_socket(), "build/qemu/flash.sock");
        assert_eq!(Daemon::from_name("rebootd"), Some(Daemon::Rebootd));
        assert_eq!(Daemon::from_name("x"), None);
        let odd = Frame::new(REPLY, 0, 0, Bytes::from_static(b"fooctl 3")).unwrap();
        let id = parse_reply(&odd).unwrap();
        assert_eq!(
            (id.daemon, id.name.as_str(), id.version),
            (None, "fooctl", 3)
        );
    }
}
