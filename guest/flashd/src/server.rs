//! The server loop: connections one at a time, each frame and link event handed to the
//! [`crate::runtime`] (one [`proto::session::Receiver`] per process, with every action it
//! asks for executed there, the slow parts on background threads — see [`crate::workers`]).
//!
//! Without a usable state directory the server runs as an explicit stub: it answers every
//! request with `ERROR no_state` and never installs anything.

use crate::config::Config;
use crate::link::{Acceptor, Conn, LinkError, LinkEvent, Recv};
use crate::runtime::Runtime;
use crate::store::{self, StateDir};
use crate::FlashdError;
use nx_contract::markers::flashd as m;
use proto::frame::Frame;
use proto::msg::{self, ErrorCode, ErrorMsg, Message, MsgType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What flashd answers to a probe (`proto::ident`).
pub(crate) const IDENT: proto::ident::Daemon = proto::ident::Daemon::Flashd;

pub use crate::console::{Output, StdOutput};

/// How long the loop waits between checks while background work is outstanding.
const BUSY_POLL: Duration = Duration::from_millis(2);

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// The host closed the link (or the link broke).
    Closed(Option<String>),
    /// Nothing arrived for the idle timeout.
    Idle,
    /// Frames arrived, but the session made no progress for the stall timeout.
    Stalled,
}

/// The server state (see the module docs).
pub struct Server {
    idle: Duration,
    stall: Duration,
    out: Arc<dyn Output>,
    mode: Mode,
}

enum Mode {
    /// No usable state dir: refuse to flash.
    Stub {
        reason: String,
    },
    Active(Box<Runtime>),
}

impl Server {
    /// Open the state dir and load the journal and install record. An unusable state dir
    /// gives a stub server (see [`Server::stub_reason`]).
    pub fn new(cfg: Config, out: Arc<dyn Output>) -> Result<Server, FlashdError> {
        let idle = cfg.idle_timeout;
        let stall = cfg.stall_timeout;
        let mode = match StateDir::open(&cfg.state_dir, cfg.require_mountpoint) {
            Ok(state) => Mode::Active(Box::new(Runtime::start(cfg, Arc::clone(&out), state)?)),
            Err(e) => Mode::Stub {
                reason: match e {
                    store::StoreError::StateDirUnusable { path, reason } => {
                        format!("{}: {reason}", path.display())
                    }
                    other => other.to_string(),
                },
            },
        };
        Ok(Server {
            idle,
            stall,
            out,
            mode,
        })
    }

    /// `Some(reason)` when the server refuses to flash (no usable state dir).
    pub fn stub_reason(&self) -> Option<&str> {
        match &self.mode {
            Mode::Stub { reason } => Some(reason),
            Mode::Active(_) => None,
        }
    }

    /// Print the startup marker: `flashd: ready`, or the explicit stub marker.
    pub fn announce(&self) {
        match &self.mode {
            Mode::Stub { reason } => self.out.show(&m::stub(reason)),
            Mode::Active(_) => self.out.show(&m::ready()),
        }
    }

    /// Serve connections from `acceptor` (forever, or one with `once`).
    pub fn serve(&mut self, acceptor: &mut dyn Acceptor, once: bool) -> Result<(), LinkError> {
        loop {
            let Some(conn) = acceptor.accept()? else {
                return Ok(());
            };
            let end = self.serve_conn(conn);
            if let ConnEnd::Closed(why) = &end {
                self.out.log(&format!(
                    "connection closed{}",
                    why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
                ));
            }
            if once {
                self.drain();
                return Ok(());
            }
        }
    }

    /// Wait until no background work is outstanding (install, syncs, verifications).
    pub fn drain(&mut self) {
        if let Mode::Active(rt) = &mut self.mode {
            rt.drain();
        }
    }

    /// Serve one connection until it closes or idles out.
    pub fn serve_conn(&mut self, mut conn: Conn) -> ConnEnd {
        if let Mode::Active(rt) = &mut self.mode {
            rt.reload_trust();
        }
        let idle = self.idle;
        let mut last = Instant::now();
        let mut stub_answered = false;
        // (progress count, when it last moved)
        let mut progress: Option<(u64, Instant)> = None;
        loop {
            let busy = match &mut self.mode {
                Mode::Active(rt) => {
                    rt.pump_results(&mut conn);
                    rt.busy()
                }
                Mode::Stub { .. } => false,
            };
            if let Mode::Active(rt) = &mut self.mode {
                let now = rt.progress();
                match progress {
                    Some((seen, _)) if seen == now => {}
                    _ => progress = Some((now, Instant::now())),
                }
                let stalled = progress.is_some_and(|(_, since)| since.elapsed() >= self.stall);
                if stalled && !busy {
                    self.out.log(&format!(
                        "dropping the connection: no progress for {} s \
                         (--stall-timeout); the next client is served",
                        self.stall.as_secs()
                    ));
                    rt.link_down(&mut conn);
                    return ConnEnd::Stalled;
                }
            }
            let wait = if busy {
                BUSY_POLL
            } else {
                idle.min(Duration::from_millis(500))
            };
            // Backpressure: a worker's backlog is full, so no frame is read (the host's
            // window stops it) until the worker caught up; the loop itself never waits on a
            // worker queue and keeps pumping results and the stall check.
            let backlogged = matches!(&self.mode, Mode::Active(rt) if rt.backlogged());
            if backlogged {
                std::thread::sleep(BUSY_POLL);
                last = Instant::now();
                continue;
            }
            match conn.recv(wait) {
                Recv::Timeout => {
                    if !busy && last.elapsed() >= idle {
                        if let Mode::Active(rt) = &mut self.mode {
                            rt.link_down(&mut conn);
                        }
                        return ConnEnd::Idle;
                    }
                }
                Recv::Event(ev) => {
                    last = Instant::now();
                    if let LinkEvent::Frame(f) = &ev {
                        // "Who are you?" (proto::ident): answered in any mode, at any point.
                        if proto::ident::is_probe(f) {
                            if let Some(reply) = proto::ident::reply_frame(IDENT) {
                                let _ = conn.send(&reply);
                            }
                            continue;
                        }
                    }
                    match (ev, &mut self.mode) {
                        (LinkEvent::Closed(why), mode) => {
                            if let Mode::Active(rt) = mode {
                                rt.link_down(&mut conn);
                            }
                            return ConnEnd::Closed(why);
                        }
                        (LinkEvent::Skipped { bytes, reason }, Mode::Active(rt)) => {
                            rt.corrupt(bytes, &reason.to_string(), &mut conn);
                        }
                        (LinkEvent::Skipped { .. }, Mode::Stub { .. }) => {}
                        (LinkEvent::Frame(f), Mode::Active(rt)) => rt.on_frame(f, &mut conn),
                        (LinkEvent::Frame(f), Mode::Stub { reason }) => {
                            stub_frame(&*self.out, &mut conn, &f, reason, &mut stub_answered);
                        }
                    }
                }
            }
        }
    }
}

/// The stub's answer to a frame: the HELLO marker, and `ERROR no_state` to each request (to a
/// flood of WRITEs once).
fn stub_frame(out: &dyn Output, conn: &mut Conn, f: &Frame, reason: &str, answered: &mut bool) {
    let is_request = matches!(
        MsgType::from_u8(f.msg_type()),
        Some(MsgType::Hello | MsgType::Info | MsgType::Done)
    );
    if let Ok(Message::Hello(h)) = Message::from_frame(f) {
        if msg::validate_peer_name(&h.host).is_ok() {
            out.show(&m::hello(&h.host, h.proto));
        }
    }
    if is_request || !*answered {
        *answered = true;
        let text = format!(
            "stub/placeholder: this target has no usable state dir ({reason}); refusing to flash \
             (attach the /state disk and restart)"
        );
        let e = ErrorMsg::new(ErrorCode::NoState, &text);
        out.show(&m::error(ErrorCode::NoState.code(), &e.text));
        if let Ok(frame) = Message::Error(e).to_frame() {
            let _ = conn.send(&frame);
        }
    }
}
