//! Framed RPC when the link loses or repeats bytes: the client recovers a lost opening
//! quickly (reset or retransmission) and the server serves every request once.

use crate::server::{serve_link, OnEof};
use crate::{call_framed, FramedError};
use capnp::capability::Rc;
use futures::io::{AsyncRead, AsyncWrite};
use proto::rpc::link;
use proto::rpc::reboot_capnp::reboot;
use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// The client's timeout in these tests (as `nx`'s): a hang shows as this.
const TIMEOUT: Duration = Duration::from_secs(15);
/// A recovered call must be done well before it.
const QUICK: Duration = Duration::from_secs(5);

/// A `Reboot` whose `factoryWipe` (a request that must never run twice) counts its calls.
struct Counting(std::rc::Rc<Cell<u32>>);

impl reboot::Server for Counting {
    async fn factory_wipe(
        self: Rc<Self>,
        _: reboot::FactoryWipeParams,
        mut results: reboot::FactoryWipeResults,
    ) -> Result<(), capnp::Error> {
        self.0.set(self.0.get() + 1);
        results.get().set_rebooting(false);
        Ok(())
    }
}

fn counting() -> (capnp::capability::Client, std::rc::Rc<Cell<u32>>) {
    let calls = std::rc::Rc::new(Cell::new(0));
    let client: reboot::Client = capnp_rpc::new_client(Counting(calls.clone()));
    (client.client, calls)
}

async fn wipe(c: reboot::Client) -> Result<bool, capnp::Error> {
    let resp = c.factory_wipe_request().send().promise.await?;
    Ok(resp.get()?.get_rebooting())
}

fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// What the wire between client and server does to the client's bytes.
#[derive(Clone, Copy)]
enum Fault {
    /// Nothing.
    None,
    /// The first `n` bytes never arrive.
    DropFirst(usize),
    /// The first frame never arrives.
    DropFirstFrame,
    /// Every write arrives twice.
    Duplicate,
}

/// Client → server bytes through `fault`; server → client bytes delayed by `delay`.
/// Returns the client's link and the server's.
fn faulty_wire(fault: Fault, delay: Duration) -> (DuplexStream, DuplexStream) {
    let (client, mut mid_c) = tokio::io::duplex(256 * 1024);
    let (mut mid_s, server) = tokio::io::duplex(256 * 1024);
    tokio::task::spawn_local(async move {
        let (mut c_r, mut c_w) = tokio::io::split(&mut mid_c);
        let (mut s_r, mut s_w) = tokio::io::split(&mut mid_s);
        let up = async {
            let mut to_drop = match fault {
                Fault::DropFirst(n) => n,
                _ => 0,
            };
            let mut first_frame: Option<Vec<u8>> =
                matches!(fault, Fault::DropFirstFrame).then(Vec::new);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match c_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut data = &buf[..n];
                let skip = to_drop.min(data.len());
                to_drop -= skip;
                data = &data[skip..];
                if let Some(pending) = first_frame.as_mut() {
                    pending.extend_from_slice(data);
                    if pending.len() < 16 {
                        continue;
                    }
                    let len =
                        u32::from_le_bytes([pending[12], pending[13], pending[14], pending[15]])
                            as usize
                            + 20;
                    if pending.len() < len {
                        continue;
                    }
                    let rest = pending.split_off(len);
                    first_frame = None;
                    if s_w.write_all(&rest).await.is_err() {
                        return;
                    }
                    continue;
                }
                if data.is_empty() {
                    continue;
                }
                let times = if matches!(fault, Fault::Duplicate) {
                    2
                } else {
                    1
                };
                for _ in 0..times {
                    if s_w.write_all(data).await.is_err() {
                        return;
                    }
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match s_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                tokio::time::sleep(delay).await;
                if c_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        futures::future::join(up, down).await;
    });
    (client, server)
}

fn serve(server: DuplexStream, bootstrap: capnp::capability::Client, on_eof: OnEof) {
    let (r, w) = tokio::io::split(server);
    tokio::task::spawn_local(async move {
        serve_link(
            r.compat(),
            w.compat_write(),
            Vec::new(),
            bootstrap,
            "test",
            "wire",
            on_eof,
        )
        .await;
    });
}

/// One `factoryWipe` through `fault`: its result, how long it took, how often it ran.
fn wipe_through(fault: Fault, delay: Duration) -> (Result<bool, FramedError>, Duration, u32) {
    run_local(async move {
        let (bootstrap, calls) = counting();
        let (client, server) = faulty_wire(fault, delay);
        serve(server, bootstrap, OnEof::End);
        let t = Instant::now();
        let r = call_framed(client, TIMEOUT, wipe).await;
        (r, t.elapsed(), calls.get())
    })
}

#[test]
fn a_clean_call_runs_once() {
    let (r, took, calls) = wipe_through(Fault::None, Duration::ZERO);
    assert!(!r.unwrap());
    assert!(took < QUICK);
    assert_eq!(calls, 1);
}

#[test]
fn a_cut_opening_is_sent_again_quickly() {
    for n in [1, 7, 16, 30] {
        let (r, took, calls) = wipe_through(Fault::DropFirst(n), Duration::ZERO);
        assert!(!r.unwrap(), "first {n} bytes dropped");
        assert!(took < QUICK, "first {n} bytes dropped: took {took:?}");
        assert_eq!(calls, 1);
    }
}

#[test]
fn a_lost_first_frame_is_sent_again_quickly() {
    let (r, took, calls) = wipe_through(Fault::DropFirstFrame, Duration::ZERO);
    assert!(!r.unwrap());
    assert!(took < QUICK, "took {took:?}");
    assert_eq!(calls, 1);
}

#[test]
fn repeated_bytes_run_a_request_once() {
    let (r, _, calls) = wipe_through(Fault::Duplicate, Duration::ZERO);
    assert!(!r.unwrap());
    assert_eq!(calls, 1);
}

#[test]
fn a_slow_answer_with_retransmissions_runs_a_request_once() {
    // The answer comes after the client has sent its opening again (twice).
    let delay = link::RETRANSMIT_FIRST * 3 + Duration::from_millis(200);
    let (r, took, calls) = wipe_through(Fault::None, delay);
    assert!(!r.unwrap());
    assert!(took < delay * 3, "took {took:?}");
    assert_eq!(calls, 1);
}

/// Write raw frames to a served link and collect the resets that come back.
async fn resets_for(frames: &[(u32, u32, &[u8])]) -> Vec<link::Event> {
    let (bootstrap, _) = counting();
    let (mut host, server) = tokio::io::duplex(64 * 1024);
    serve(server, bootstrap, OnEof::End);
    let mut wire = Vec::new();
    for (session, seq, data) in frames {
        link::encode(*session, *seq, data, &mut wire).unwrap();
    }
    host.write_all(&wire).await.unwrap();
    let mut dec = link::LinkDecoder::new();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(300), host.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        dec.push(&buf[..n]);
        while let Some(e) = dec.next_event() {
            if matches!(e, link::Event::Reset { .. }) {
                got.push(e);
            }
        }
    }
    got
}

#[test]
fn a_session_without_its_start_is_reset_as_not_started_once() {
    let got = run_local(resets_for(&[(7, 1, b"late"), (7, 2, b"later")]));
    assert_eq!(
        got,
        vec![link::Event::Reset {
            session: 7,
            reason: link::ResetReason::NotStarted
        }]
    );
}

#[test]
fn a_session_with_a_gap_is_reset_as_lost_and_not_restarted() {
    // An incomplete capnp segment table: the RPC system waits for more.
    let got = run_local(resets_for(&[
        (9, 0, &[0, 0, 0, 0]),
        (9, 2, b"gap"),
        (9, 0, &[0, 0, 0, 0]),
    ]));
    assert_eq!(
        got,
        vec![link::Event::Reset {
            session: 9,
            reason: link::ResetReason::Lost
        }]
    );
}

#[test]
fn a_lost_session_fails_the_call_at_once() {
    run_local(async {
        // A server that resets every session it sees as lost.
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::task::spawn_local(async move {
            let mut dec = link::LinkDecoder::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok(n) = server.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                dec.push(&buf[..n]);
                while let Some(e) = dec.next_event() {
                    if let link::Event::Chunk(c) = e {
                        let mut f = Vec::new();
                        link::encode_reset(c.session, link::ResetReason::Lost, &mut f);
                        let _ = server.write_all(&f).await;
                    }
                }
            }
        });
        let t = Instant::now();
        let r = call_framed(client, TIMEOUT, wipe).await;
        assert!(matches!(r, Err(FramedError::Closed(Some(_)))), "{r:?}");
        assert!(t.elapsed() < QUICK);
    });
}

/// A port's read side that returns an EOF once, after the first `before` bytes (a stale
/// EOF: the host that connected is still there).
struct StaleEof<R> {
    inner: R,
    before: usize,
    eof_done: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for StaleEof<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.eof_done {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.before == 0 {
            this.eof_done = true;
            return Poll::Ready(Ok(0));
        }
        let max = this.before.min(buf.len());
        let r = Pin::new(&mut this.inner).poll_read(cx, &mut buf[..max]);
        if let Poll::Ready(Ok(n)) = r {
            this.before -= n;
        }
        r
    }
}

/// A writer shared by the successive serve loops of one port.
struct Shared<W>(std::rc::Rc<RefCell<W>>);

impl<W: AsyncWrite + Unpin> AsyncWrite for Shared<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}

/// The CI failure: a stale EOF read after the first bytes of a new host connection.
fn stale_eof_call(before: usize, on_eof: OnEof) -> (Result<bool, FramedError>, Duration, u32) {
    run_local(async move {
        let (bootstrap, calls) = counting();
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (r, w) = tokio::io::split(server);
        let w = std::rc::Rc::new(RefCell::new(w.compat_write()));
        tokio::task::spawn_local(async move {
            let mut read = StaleEof {
                inner: r.compat(),
                before,
                eof_done: false,
            };
            // As the port loop before the fix did: a new serve after each EOF.
            loop {
                serve_link(
                    &mut read,
                    Shared(w.clone()),
                    Vec::new(),
                    bootstrap.clone(),
                    "test",
                    "port",
                    on_eof,
                )
                .await;
            }
        });
        let t = Instant::now();
        let r = call_framed(client, TIMEOUT, wipe).await;
        (r, t.elapsed(), calls.get())
    })
}

#[test]
fn a_stale_eof_on_a_port_loses_nothing() {
    for before in [5, 20, 40] {
        let (r, took, calls) = stale_eof_call(before, OnEof::Pause);
        assert!(!r.unwrap());
        // One pause of the port poll, no retransmission needed.
        assert!(took < link::RETRANSMIT_FIRST, "took {took:?}");
        assert_eq!(calls, 1);
    }
}

#[test]
fn a_stale_eof_ending_the_link_is_recovered_quickly() {
    // Even where an EOF ends the serve loop (and the bytes read so far are lost), the
    // client does not wait out its timeout.
    for before in [5, 20] {
        let (r, took, calls) = stale_eof_call(before, OnEof::End);
        assert!(!r.unwrap());
        assert!(took < QUICK, "took {took:?}");
        assert_eq!(calls, 1);
    }
}
