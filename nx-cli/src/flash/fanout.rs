//! `nx flash send IMG --port A --port B …`: flash several targets concurrently.
//!
//! One tokio task per target, each running the same [`send::send_image_with`] as a single
//! transfer. What can be shared is: the image file (one open handle, positioned reads), its
//! head check (done once, before any connection) and the local check that hashes every
//! segment (one thread for all targets, [`SharedCheck`]). What cannot is per target and bounded
//! like a single transfer: each target reads its own chunks, at most `window + read-ahead`
//! chunks in memory per target. A failure on one target never stops the others.
//!
//! Output (documented in `docs/tools/nx-flash.md`, "Several targets"): plain lines prefixed with
//! `[<target>] `, NDJSON events carrying `target` and `target_index`, one indicatif
//! `MultiProgress` on a terminal, then a per-target summary and the combined exit code
//! ([`combine_exit`]).

use super::image_file::SharedCheck;
use super::receipt::{Receipt, RECEIPT_VERSION};
use super::render::{rate_mb_s, OutputMode, Renderer, SharedBars, TargetTag};
use super::send::{self, SendFailure, SendReport};
use super::{
    again_command, exit, failure, host_name, installed_verb, open_image, receipt_event,
    report_error, runtime, say_installed, send_options, write_receipt, SendArgs,
};
use crate::transport::PortSpec;
use anyhow::Context as _;
use std::time::Duration;

/// How one target ended.
#[derive(Debug, Clone)]
pub struct TargetResult {
    pub tag: TargetTag,
    pub port: PortSpec,
    /// Exit code this target alone would have given (`0` installed or unchanged).
    pub code: u8,
    /// The receipt (`state: failed` for a failed target).
    pub receipt: Receipt,
    /// Why it failed.
    pub error: Option<String>,
    pub elapsed: Duration,
    /// Effective rate (image size over elapsed time) of a successful transfer.
    pub mb_s: Option<f64>,
}

impl TargetResult {
    /// `installed`, `unchanged` or `failed`.
    pub fn state(&self) -> &str {
        if self.code == exit::OK {
            self.receipt.state.as_str()
        } else {
            "failed"
        }
    }

    /// The summary line: `target unix:A: installed (…)` / `target unix:B: failed: … (exit 5)`.
    pub fn summary_line(&self) -> String {
        match &self.error {
            None => format!(
                "target {}: {} (version {}, {:.1} MB/s effective, {:.2} s)",
                self.tag.id,
                installed_verb(&self.receipt.state),
                self.receipt.image_version,
                self.mb_s.unwrap_or(0.0),
                self.elapsed.as_secs_f64()
            ),
            Some(e) => format!("target {}: failed: {e} (exit {})", self.tag.id, self.code),
        }
    }
}

/// The exit code of several targets: 0 if every target succeeded, otherwise the most specific
/// failure among them, in this order: 130 (interrupted: the user stopped the run) > 3 (the
/// image is invalid: no target can take it) > 4 (a target refused: needs a look, a re-run does
/// not help) > 5 (unreachable or link lost: a re-run resumes) > 1 (local error).
pub fn combine_exit(codes: impl IntoIterator<Item = u8>) -> u8 {
    fn rank(code: u8) -> u8 {
        match code {
            exit::OK => 0,
            exit::LINK_LOST => 2,
            exit::TARGET_REFUSED => 3,
            exit::IMAGE_INVALID => 4,
            exit::INTERRUPTED => 5,
            // ERROR and anything unforeseen.
            _ => 1,
        }
    }
    codes
        .into_iter()
        .max_by_key(|c| rank(*c))
        .unwrap_or(exit::OK)
}

/// `nx flash send` with several `--port`; returns the exit code.
pub(super) fn run(a: SendArgs) -> anyhow::Result<u8> {
    let ports = a.ports.clone();
    let ids: Vec<String> = ports.iter().map(ToString::to_string).collect();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            eprintln!("nx: error: --port {id} is given twice");
            eprintln!("nx: each target is flashed once; list every port a single time");
            return Ok(exit::USAGE);
        }
    }
    let mode = OutputMode::choose(a.json, a.quiet);
    let bars = (mode == OutputMode::Bars).then(|| {
        let width = ids.iter().map(|i| i.chars().count()).max().unwrap_or(0);
        SharedBars::new(ids.len(), width)
    });
    let mut renderers: Vec<Renderer> = ids
        .iter()
        .enumerate()
        .map(|(index, id)| {
            let tag = TargetTag {
                id: id.clone(),
                index,
            };
            Renderer::for_target(mode, tag, bars.as_ref())
        })
        .collect();

    let results = match open_image(&a.image) {
        Err((code, text)) => {
            // The image is the same for every target: said once, every target failed.
            if mode == OutputMode::Json {
                for r in &renderers {
                    report_error(r, code, &text, None);
                }
            } else {
                eprintln!("nx: error: {text}");
            }
            ports
                .iter()
                .zip(&mut renderers)
                .map(|(port, r)| {
                    r.conclude(false, "failed: image invalid".into());
                    TargetResult {
                        tag: tag_of(r),
                        port: port.clone(),
                        code,
                        receipt: failed_receipt(port),
                        error: Some(text.clone()),
                        elapsed: Duration::ZERO,
                        mb_s: None,
                    }
                })
                .collect()
        }
        Ok(img) => {
            let opts = send_options(&a);
            let rt = runtime()?;
            let image_path = a.image.clone();
            let results = rt.block_on(async {
                let interrupt = send::interrupt_flag();
                let check = SharedCheck::new();
                let mut tasks = Vec::with_capacity(ports.len());
                for (port, mut r) in ports.iter().cloned().zip(renderers.drain(..)) {
                    let (img, opts, check, interrupt) =
                        (img.clone(), opts.clone(), check.clone(), interrupt.clone());
                    let again = again_command(&image_path, std::slice::from_ref(&port));
                    let tag = tag_of(&r);
                    let task = tokio::spawn(async move {
                        let mut link = port.clone();
                        let res = send::send_image_with(
                            img.clone(),
                            &check,
                            &mut link,
                            &opts,
                            &mut r,
                            interrupt,
                        )
                        .await;
                        let result = conclude(&mut r, port, res, img.len(), &again);
                        (r, result)
                    });
                    tasks.push((tag, task));
                }
                let mut out = Vec::with_capacity(tasks.len());
                for (tag, task) in tasks {
                    out.push((tag, task.await));
                }
                out
            });
            // Do not wait for blocking reads still queued: the process is done.
            rt.shutdown_timeout(Duration::from_millis(200));
            let mut done = Vec::with_capacity(results.len());
            for ((tag, joined), port) in results.into_iter().zip(&ports) {
                match joined {
                    Ok((r, res)) => {
                        renderers.push(r);
                        done.push(res);
                    }
                    Err(e) => {
                        // The task died (a bug): this target failed, the others are reported.
                        let text = format!("internal error in the transfer task: {e}");
                        let r = Renderer::for_target(mode, tag.clone(), None);
                        report_error(&r, exit::ERROR, &text, None);
                        renderers.push(r);
                        done.push(TargetResult {
                            tag,
                            port: port.clone(),
                            code: exit::ERROR,
                            receipt: failed_receipt(port),
                            error: Some(text),
                            elapsed: Duration::ZERO,
                            mb_s: None,
                        });
                    }
                }
            }
            done
        }
    };

    let mut code = combine_exit(results.iter().map(|t| t.code));
    let receipts: Vec<&Receipt> = results.iter().map(|t| &t.receipt).collect();
    if let Some(path) = &a.receipt {
        let written = serde_json::to_string(&receipts)
            .context("receipt")
            .and_then(|json| write_receipt(path, &json));
        if let Err(e) = written {
            eprintln!("nx: error: {e:#}");
            eprintln!("nx: the receipts are still printed on stdout");
            code = combine_exit([code, exit::ERROR]);
        }
    }
    let installed = results.iter().filter(|t| t.code == exit::OK).count();
    if let Some(b) = &bars {
        b.finish(format!(
            "{installed} of {} targets installed",
            results.len()
        ));
    }
    if mode == OutputMode::Json {
        for (t, r) in results.iter().zip(&renderers) {
            r.json(&serde_json::json!({
                "event": "summary",
                "state": t.state(),
                "exit_code": t.code,
                "error": t.error,
                "mb_s": t.mb_s,
                "elapsed_s": t.elapsed.as_secs_f64(),
            }));
        }
    } else {
        // The receipts, one line per target in --port order (stdout).
        for t in &results {
            let line = serde_json::to_string(&t.receipt).context("receipt")?;
            println!("{line}");
        }
        let failed: Vec<&TargetResult> = results.iter().filter(|t| t.code != exit::OK).collect();
        if mode != OutputMode::Quiet || !failed.is_empty() {
            eprintln!(
                "nx: summary: {installed} of {} targets installed, {} failed (exit {code})",
                results.len(),
                failed.len()
            );
        }
        for t in &results {
            if mode != OutputMode::Quiet || t.code != exit::OK {
                eprintln!("nx: {}", t.summary_line());
            }
        }
        let resumable: Vec<PortSpec> = failed
            .iter()
            .filter(|t| matches!(t.code, exit::LINK_LOST | exit::INTERRUPTED))
            .map(|t| t.port.clone())
            .collect();
        if !resumable.is_empty() {
            eprintln!(
                "nx: the failed transfers are resumable: {}",
                again_command(&a.image, &resumable)
            );
        }
    }
    Ok(code)
}

/// The receipt of a target that never got as far as a session.
fn failed_receipt(port: &PortSpec) -> Receipt {
    Receipt {
        receipt_version: RECEIPT_VERSION,
        writer: proto::receipt::Writer::Nx,
        host: host_name(),
        target: port.to_string(),
        state: proto::receipt::InstallState::Failed,
        ..Receipt::default()
    }
}

fn tag_of(r: &Renderer) -> TargetTag {
    r.target().cloned().unwrap_or(TargetTag {
        id: String::new(),
        index: 0,
    })
}

/// Report how one target ended (its own lines, its `receipt` event, its bar) as soon as it
/// ends, and sum it up for the summary.
fn conclude(
    r: &mut Renderer,
    port: PortSpec,
    res: Result<SendReport, SendFailure>,
    image_len: u64,
    again: &str,
) -> TargetResult {
    let tag = tag_of(r);
    match res {
        Ok(rep) => {
            say_installed(r, &rep, image_len);
            let mb_s = rate_mb_s(image_len, rep.elapsed);
            if let Ok(v) = receipt_event(&rep.receipt) {
                r.json(&v);
            }
            r.conclude(
                true,
                format!("{} {mb_s:.1} MB/s", installed_verb(&rep.receipt.state)),
            );
            TargetResult {
                tag,
                port,
                code: exit::OK,
                receipt: rep.receipt,
                error: None,
                elapsed: rep.elapsed,
                mb_s: Some(mb_s),
            }
        }
        Err(f) => {
            let (code, hint) = failure(&f.error, again);
            let text = f.error.to_string();
            report_error(r, code, &text, hint.as_deref());
            if let Ok(v) = receipt_event(&f.receipt) {
                r.json(&v);
            }
            r.conclude(false, format!("failed (exit {code})"));
            TargetResult {
                tag,
                port,
                code,
                receipt: *f.receipt,
                error: Some(text),
                elapsed: f.elapsed,
                mb_s: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_exit_code_is_the_most_specific_failure() {
        assert_eq!(combine_exit([]), 0);
        assert_eq!(combine_exit([0, 0, 0]), 0);
        assert_eq!(combine_exit([0, 5]), 5);
        assert_eq!(combine_exit([1, 5, 0]), 5);
        assert_eq!(combine_exit([5, 4, 0]), 4);
        assert_eq!(combine_exit([4, 3, 5]), 3);
        assert_eq!(combine_exit([3, 130, 0]), 130);
        assert_eq!(combine_exit([0, 1]), 1);
        assert_eq!(combine_exit([0, 77]), 77);
    }
}
