//! Several targets at once: one tokio task per target, each running the same
//! [`send::send_image_with`] as a single transfer.
//!
//! What can be shared is: the image file (one open handle, positioned reads), its head check
//! (done once, before any connection) and the local check that hashes every segment (one
//! thread for all targets, [`SharedCheck`]). What cannot is per target and bounded like a
//! single transfer: each target reads its own chunks, at most `window + read-ahead` chunks in
//! memory per target. A failure on one target never stops the others.
//!
//! Every target has its own [`ProgressSink`]; `on_done` runs in the target's task as soon as
//! that target ends (so its outcome can be reported before the others finish).

use crate::event::ProgressSink;
use crate::image_file::{ImageFile, SharedCheck};
use crate::send::{self, SendFailure, SendOptions, SendReport};
use crate::transport::PortSpec;
use std::sync::Arc;
use tokio::sync::watch;

/// One target of a fan-out: where it is and where its events go.
#[derive(Debug)]
pub struct Target<S> {
    pub port: PortSpec,
    pub sink: S,
}

/// A target's task died (a bug in the engine): its sink is lost with it.
#[derive(Debug, thiserror::Error)]
#[error("internal error in the transfer task: {0}")]
pub struct TaskFailed(#[source] pub tokio::task::JoinError);

/// Flash `img` to every target concurrently; one entry per target, in the given order: the
/// sink back and what `on_done` made of the target's outcome, or the task failure.
pub async fn send_all<S, T, F>(
    img: Arc<ImageFile>,
    targets: Vec<Target<S>>,
    opts: &SendOptions,
    interrupt: watch::Receiver<bool>,
    on_done: F,
) -> Vec<Result<(S, T), TaskFailed>>
where
    S: ProgressSink + 'static,
    T: Send + 'static,
    F: Fn(&mut S, PortSpec, Result<SendReport, SendFailure>) -> T + Clone + Send + 'static,
{
    let check = SharedCheck::new();
    let mut tasks = Vec::with_capacity(targets.len());
    for Target { port, mut sink } in targets {
        let (img, opts, check, interrupt, on_done) = (
            img.clone(),
            opts.clone(),
            check.clone(),
            interrupt.clone(),
            on_done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut link = port.clone();
            let res =
                send::send_image_with(img, &check, &mut link, &opts, &mut sink, interrupt).await;
            let out = on_done(&mut sink, port, res);
            (sink, out)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.map_err(TaskFailed));
    }
    out
}
