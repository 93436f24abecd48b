//! `nx flash send IMG --port A --port B …`: flash several targets concurrently.
//!
//! The orchestration (one task per target, the image and its check shared, a failure on one
//! target never stopping the others) is [`nx_engine::fanout`]; this module gives each target
//! its [`Renderer`] and reports how each ended.
//!
//! Output (documented in `docs/tools/nx-flash.md`, "Several targets"): plain lines prefixed with
//! `[<target>] `, NDJSON events carrying `target` and `target_index`, one indicatif
//! `MultiProgress` on a terminal, then a per-target summary and the combined exit code
//! ([`combine_exit`]).

use super::render::{rate_mb_s, OutputMode, Renderer, SharedBars, TargetTag};
use super::{
    again_command, exit, failure, installed_verb, open_image, receipt_event, report_error, runtime,
    say_installed, send_options, write_receipt, SendArgs,
};
use anyhow::Context as _;
use nx_engine::fanout::{self as engine_fanout, Target};
use nx_engine::host_name;
use nx_engine::receipt::{Receipt, RECEIPT_VERSION};
use nx_engine::send::{self, SendFailure, SendReport};
use nx_engine::transport::PortSpec;
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
/// image is invalid: no target can take it) > 4 (a target does not trust the image) > 6 (a
/// target refused: needs a look, a re-run does not help) > 5 (unreachable or link lost: a
/// re-run resumes) > 1 (local error).
pub fn combine_exit(codes: impl IntoIterator<Item = u8>) -> u8 {
    fn rank(code: u8) -> u8 {
        match code {
            exit::OK => 0,
            exit::LINK_LOST => 2,
            exit::TARGET_REFUSED => 3,
            exit::TRUST => 4,
            exit::IMAGE_INVALID => 5,
            exit::INTERRUPTED => 6,
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
    if let Some(p) = &a.receipt {
        if let Err(e) = crate::outpath::check(p, "the receipt") {
            eprintln!("nx: error: {e}");
            return Ok(e.exit.code());
        }
    }
    let mode = OutputMode::choose(a.json, !crate::verbosity::notes());
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
            let mut r = Renderer::for_target(mode, tag, bars.as_ref());
            r.set_asked(super::asked(&a));
            r
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
            let opts = match send_options(&a, &img) {
                Ok(o) => o,
                Err(e) => anyhow::bail!("{e}"),
            };
            let rt = runtime()?;
            let image_path = a.image.clone();
            let image_len = img.len();
            let tags: Vec<TargetTag> = renderers.iter().map(tag_of).collect();
            let targets: Vec<Target<Renderer>> = ports
                .iter()
                .cloned()
                .zip(renderers.drain(..))
                .map(|(port, sink)| Target { port, sink })
                .collect();
            let results = rt.block_on(async {
                let interrupt = send::interrupt_flag();
                engine_fanout::send_all(img, targets, &opts, interrupt, move |r, port, res| {
                    let again = again_command(&image_path, std::slice::from_ref(&port));
                    conclude(r, port, res, image_len, &again)
                })
                .await
            });
            // Do not wait for blocking reads still queued: the process is done.
            rt.shutdown_timeout(Duration::from_millis(200));
            let mut done = Vec::with_capacity(results.len());
            for ((tag, joined), port) in tags.into_iter().zip(results).zip(&ports) {
                match joined {
                    Ok((r, res)) => {
                        renderers.push(r);
                        done.push(res);
                    }
                    Err(e) => {
                        // The task died (a bug): this target failed, the others are reported.
                        let text = e.to_string();
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
        assert_eq!(combine_exit([5, 6, 0]), 6);
        assert_eq!(combine_exit([6, 4]), 4);
        assert_eq!(combine_exit([4, 3, 5]), 3);
        assert_eq!(combine_exit([3, 130, 0]), 130);
        assert_eq!(combine_exit([0, 1]), 1);
        assert_eq!(combine_exit([0, 77]), 77);
    }
}
