//! Output of `nx flash send`: indicatif bars on a terminal, plain progress lines when piped,
//! NDJSON events with `--json`, nothing but the receipt with `--quiet`.
//!
//! Architecture invariant: only nx-cli writes to a terminal; the engine reports progress as
//! [`EngineEvent`] values to a [`ProgressSink`] and this module (the [`Renderer`]) renders them.
//!
//! With several targets (`--port A --port B`) every target has its own renderer tagged with a
//! [`TargetTag`]: plain lines are prefixed with `[<target>] `, every NDJSON event carries
//! `target` and `target_index`, and on a terminal the renderers share one [`SharedBars`]
//! (one bar per target under an aggregate bar). Without a tag the output is the single-target
//! output, unchanged.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nx_engine::{EngineEvent, ProgressSink};
use proto::session::ProgressEvent;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Bars on stderr (stderr is a terminal).
    Bars,
    /// Plain lines on stderr, at most one progress line per second.
    Plain,
    /// NDJSON events on stdout.
    Json,
    /// Errors only (and the final receipt line).
    Quiet,
}

impl OutputMode {
    /// Pick the mode from the flags and whether stderr is a terminal.
    pub fn choose(json: bool, quiet: bool) -> OutputMode {
        if json {
            OutputMode::Json
        } else if quiet {
            OutputMode::Quiet
        } else if std::io::stderr().is_terminal() && !dumb_terminal() {
            OutputMode::Bars
        } else {
            OutputMode::Plain
        }
    }
}

/// `TERM=dumb` (or no TERM): a terminal that cannot redraw bars; it gets plain lines.
fn dumb_terminal() -> bool {
    std::env::var("TERM").map_or(true, |t| t.is_empty() || t == "dumb")
}

/// Which target a renderer speaks for when `nx flash send` flashes several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTag {
    /// The `--port` spec as given (normalised: `unix:PATH`, `tcp:HOST:PORT`, `serial:DEV@BAUD`).
    pub id: String,
    /// Position among the `--port` arguments, from 0.
    pub index: usize,
}

/// One `MultiProgress` for every target on a terminal: an aggregate bar over all targets and
/// one bar per target (added in `--port` order).
#[derive(Clone)]
pub struct SharedBars {
    mp: MultiProgress,
    all: ProgressBar,
    style: ProgressStyle,
}

impl SharedBars {
    /// Bars for `targets` targets whose ids are at most `id_width` characters wide.
    pub fn new(targets: usize, id_width: usize) -> SharedBars {
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let w = id_width.clamp(5, 48);
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:>{w}}} [{{bar:32.cyan/blue}}] {{bytes:>10}}/{{total_bytes:<10}} {{decimal_bytes_per_sec:>12}} eta {{eta:>4}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let all = mp.add(ProgressBar::new(0));
        all.set_style(style.clone());
        all.set_prefix("all");
        all.set_message(format!("{targets} targets"));
        SharedBars { mp, all, style }
    }

    /// A line above the bars.
    pub fn println(&self, text: &str) {
        let _ = self.mp.println(text);
    }

    /// Every target is done: stop the aggregate bar.
    pub fn finish(&self, message: String) {
        self.all.finish_with_message(message);
    }
}

/// A target's own bar in [`SharedBars`].
struct FanBar {
    shared: SharedBars,
    bar: ProgressBar,
    /// What this target added to the aggregate bar's position and length.
    counted: u64,
    length_added: bool,
}

impl FanBar {
    fn set_position(&mut self, pos: u64) {
        self.bar.set_position(pos);
        if pos > self.counted {
            self.shared.all.inc(pos - self.counted);
        } else if pos < self.counted {
            self.shared.all.dec(self.counted - pos);
        }
        self.counted = pos;
    }
}

/// The renderer.
pub struct Renderer {
    mode: OutputMode,
    target: Option<TargetTag>,
    fan: Option<FanBar>,
    mp: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    segs: Vec<(String, ProgressBar)>,
    last_line: Option<Instant>,
    last_json_progress: Option<Instant>,
    pending_json_progress: Option<ProgressEvent>,
    session_start: Option<(Instant, u64)>,
    retransmits: u64,
    asked: Option<Asked>,
}

/// What the user asked for (`--chunk`, `--window`) and whether explicitly: a session that
/// starts with other values gets one line saying so and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// Chunk size offered.
    pub chunk: u32,
    /// `--chunk` was given.
    pub chunk_explicit: bool,
    /// Window offered.
    pub window: u16,
    /// `--window` was given.
    pub window_explicit: bool,
}

impl Asked {
    /// The lines explaining how the session's `chunk` and `window` differ from what was asked.
    pub fn notes(&self, chunk: u32, window: u16) -> Vec<String> {
        let mut out = Vec::new();
        let kib = |c: u32| format!("{} KiB", c / 1024);
        if chunk != self.chunk {
            out.push(if self.chunk_explicit {
                format!(
                    "nx: note: chunk {}, not --chunk {}: the target's limit, or it resumes a \
                     staged transfer of this image made with {} chunks",
                    kib(chunk),
                    kib(self.chunk),
                    kib(chunk)
                )
            } else {
                format!(
                    "nx: note: chunk {}, not the default {}: the target chose it (its skip index \
                     of the installed image or a staged transfer uses {} chunks, so identical \
                     chunks are copied, not sent); pass --chunk to choose",
                    kib(chunk),
                    kib(self.chunk),
                    kib(chunk)
                )
            });
        }
        if window != self.window {
            out.push(format!(
                "nx: note: window {window}, not {}{}: the target's maximum",
                if self.window_explicit {
                    "--window "
                } else {
                    "the default "
                },
                self.window
            ));
        }
        out
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Human size: `12.3 MiB`, `812 KiB`, `17 B`.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        mib(b)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// MB/s (decimal megabytes) of `bytes` over `d`.
pub fn rate_mb_s(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        bytes as f64 / 1e6 / s
    }
}

impl Renderer {
    pub fn new(mode: OutputMode) -> Renderer {
        Renderer {
            mode,
            target: None,
            fan: None,
            mp: None,
            overall: None,
            segs: Vec::new(),
            last_line: None,
            last_json_progress: None,
            pending_json_progress: None,
            session_start: None,
            retransmits: 0,
            asked: None,
        }
    }

    /// Remember what the user asked for (see [`Asked`]).
    pub fn set_asked(&mut self, asked: Asked) {
        self.asked = Some(asked);
    }

    /// The renderer of one of several targets: lines prefixed with `[<target>] `, NDJSON events
    /// with `target`/`target_index`, and (in [`OutputMode::Bars`]) a bar of its own in `bars`.
    pub fn for_target(mode: OutputMode, tag: TargetTag, bars: Option<&SharedBars>) -> Renderer {
        let mut r = Renderer::new(mode);
        if mode == OutputMode::Bars {
            if let Some(shared) = bars {
                let bar = shared.mp.add(ProgressBar::new(0));
                bar.set_style(shared.style.clone());
                bar.set_prefix(tag.id.clone());
                bar.set_message("connecting");
                r.fan = Some(FanBar {
                    shared: shared.clone(),
                    bar,
                    counted: 0,
                    length_added: false,
                });
            }
        }
        r.target = Some(tag);
        r
    }

    pub fn mode(&self) -> OutputMode {
        self.mode
    }

    /// The target this renderer speaks for (several targets only).
    pub fn target(&self) -> Option<&TargetTag> {
        self.target.as_ref()
    }

    /// `text` with the target prefix (`[<target>] `) when there are several targets.
    fn tagged(&self, text: &str) -> String {
        match &self.target {
            Some(t) => format!("[{}] {text}", t.id),
            None => text.to_string(),
        }
    }

    /// A line on stderr, above the bars if there are any.
    fn line(&self, text: &str) {
        let text = self.tagged(text);
        if let Some(f) = &self.fan {
            f.shared.println(&text);
        } else if let Some(mp) = &self.mp {
            let _ = mp.println(&text);
        } else {
            eprintln!("{text}");
        }
    }

    /// An error line for a human (stderr) in every mode but JSON (errors are shown even with
    /// `--quiet`).
    pub fn error_line(&self, text: &str) {
        if self.mode != OutputMode::Json {
            self.line(text);
        }
    }

    /// The target's bar shows its final state (several targets on a terminal only).
    pub fn conclude(&mut self, ok: bool, message: String) {
        if let Some(f) = self.fan.take() {
            if ok {
                f.bar.finish_with_message(message);
            } else {
                f.bar.abandon_with_message(message);
            }
        }
    }

    /// Retransmissions seen so far.
    pub fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// A line for a human (stderr), shown above the bars. Nothing in JSON/quiet mode.
    pub fn say(&self, text: &str) {
        match self.mode {
            OutputMode::Bars | OutputMode::Plain => self.line(text),
            OutputMode::Json | OutputMode::Quiet => {}
        }
    }

    /// One NDJSON line on stdout (JSON mode only); with several targets it carries `target`
    /// and `target_index`.
    pub fn json(&self, v: &serde_json::Value) {
        if self.mode != OutputMode::Json {
            return;
        }
        let line = match (&self.target, v.as_object()) {
            (Some(t), Some(o)) => {
                let mut o = o.clone();
                o.insert("target".into(), t.id.clone().into());
                o.insert("target_index".into(), t.index.into());
                serde_json::Value::Object(o).to_string()
            }
            _ => v.to_string(),
        };
        // One locked write per event: lines of concurrent targets never interleave.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Render one event.
    pub fn show(&mut self, ev: &EngineEvent) {
        match ev {
            EngineEvent::Connecting { port, attempt } => {
                self.json(&json!({"event": "connecting", "port": port, "attempt": attempt}));
                if *attempt > 1 || crate::verbosity::verbose() {
                    self.say(&format!("nx: connecting to {port} (attempt {attempt})"));
                }
            }
            EngineEvent::Reconnect {
                error,
                attempt,
                max,
                delay,
            } => {
                self.json(&json!({
                    "event": "link_lost", "error": error, "attempt": attempt,
                    "max_attempts": max, "retry_in_ms": delay.as_millis() as u64
                }));
                self.say(&format!(
                    "nx: link lost ({error}); reconnecting in {:.1} s (attempt {}/{max})",
                    delay.as_secs_f64(),
                    attempt + 1
                ));
            }
            EngineEvent::Session(ev) => self.session(ev),
            EngineEvent::Finished => self.finish(),
        }
    }

    fn session(&mut self, ev: &ProgressEvent) {
        // The last progress held back by the throttle goes out before the session's end event
        // (so the final figures are seen), never before other events: per-chunk events
        // (skips, retransmits) would otherwise defeat the throttle.
        if matches!(ev, ProgressEvent::Done { .. } | ProgressEvent::Error { .. }) {
            self.flush_json_progress();
        }
        match ev {
            ProgressEvent::Start {
                version,
                device,
                image_size,
                data_bytes,
                chunk_size,
                window,
                compression,
                segments,
                ..
            } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                self.session_start = Some((Instant::now(), 0));
                for note in self
                    .asked
                    .map(|a| a.notes(*chunk_size, *window))
                    .unwrap_or_default()
                {
                    self.say(&note);
                }
                self.say(&format!(
                    "nx: flashing version {version} to {device}: {} image, {} of data, {} segment(s), chunk {} KiB, window {window}, compression {compression}",
                    human_bytes(*image_size),
                    human_bytes(*data_bytes),
                    segments.len(),
                    chunk_size / 1024
                ));
                if let Some(f) = &mut self.fan {
                    f.bar.set_length(*data_bytes);
                    f.bar.set_message(format!("version {version}"));
                    f.bar.reset_eta();
                    if !f.length_added {
                        f.length_added = true;
                        f.shared.all.inc_length(*data_bytes);
                    }
                    f.set_position(0);
                } else if self.mode == OutputMode::Bars {
                    self.setup_bars(*data_bytes, segments);
                }
            }
            ProgressEvent::Base { image_id, held } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                let short = image_id.get(..16).unwrap_or(image_id);
                if *held {
                    self.say(&format!(
                        "nx: the target runs image {short}…, which this host holds: sending only the changes"
                    ));
                } else {
                    self.say(&format!(
                        "nx: the target runs image {short}…; pass it with --base IMG to send only the changes"
                    ));
                }
            }
            ProgressEvent::Unprovisioned { device } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                // A warning: shown even with --quiet (like errors).
                self.error_line(&format!(
                    "nx: warning: {device} has no trust key provisioned (stub/placeholder): it \
                     accepts unsigned images from anyone. Provision a key (docs/tools/trust.md) \
                     and send signed images (`nx image build --sign KEY`)."
                ));
            }
            ProgressEvent::Resumed {
                seq,
                at_offset,
                done_bytes,
            } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                if let Some((t, _)) = self.session_start {
                    self.session_start = Some((t, *done_bytes));
                }
                self.say(&format!(
                    "nx: resumed at {at_offset} bytes (chunk {seq}; {} already on the target)",
                    human_bytes(*done_bytes)
                ));
                if let Some(o) = &self.overall {
                    o.set_position(*done_bytes);
                    o.reset_eta();
                }
                if let Some(f) = &mut self.fan {
                    f.set_position(*done_bytes);
                    f.bar.reset_eta();
                }
            }
            ProgressEvent::Skipped { .. } => {
                // Cumulative figures are in the summary (the engine adds them up in
                // `SendReport::skips`); per-chunk skips would flood NDJSON.
            }
            ProgressEvent::Progress {
                segment,
                segment_done,
                done_bytes,
                total_bytes,
                ..
            } => match self.mode {
                OutputMode::Bars => {
                    if let Some(f) = &mut self.fan {
                        f.set_position(*done_bytes);
                        f.bar.set_message(format!("segment {segment}"));
                    }
                    if let Some(o) = &self.overall {
                        o.set_position(*done_bytes);
                    }
                    if let Some((_, b)) = self.segs.iter().find(|(n, _)| n == segment) {
                        b.set_position(*segment_done);
                    }
                }
                OutputMode::Plain => {
                    let due = self
                        .last_line
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                    if due || done_bytes == total_bytes {
                        self.last_line = Some(Instant::now());
                        self.line(&self.plain_line(segment, *done_bytes, *total_bytes));
                    }
                }
                OutputMode::Json => {
                    let due = self
                        .last_json_progress
                        .is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
                    if due {
                        self.last_json_progress = Some(Instant::now());
                        self.pending_json_progress = None;
                        self.json(&serde_json::to_value(ev).unwrap_or_default());
                    } else {
                        self.pending_json_progress = Some(ev.clone());
                    }
                }
                OutputMode::Quiet => {}
            },
            ProgressEvent::Retransmit { from_seq, reason } => {
                self.retransmits += 1;
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                if self.mode == OutputMode::Plain && self.retransmits <= 3 {
                    self.line(&format!("nx: resending from chunk {from_seq} ({reason})"));
                }
            }
            ProgressEvent::SegmentVerified { segment } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                match self.mode {
                    OutputMode::Bars => {
                        if let Some(f) = &self.fan {
                            f.bar.set_message(format!("{segment} verified"));
                        }
                        if let Some((_, b)) = self.segs.iter().find(|(n, _)| n == segment) {
                            b.finish_with_message(format!("{segment} verified"));
                        }
                    }
                    OutputMode::Plain => {
                        self.line(&format!("nx: segment {segment} verified by the target"))
                    }
                    _ => {}
                }
            }
            ProgressEvent::Done { .. } | ProgressEvent::Error { .. } => {
                self.json(&serde_json::to_value(ev).unwrap_or_default());
                self.clear_bars();
            }
        }
    }

    fn flush_json_progress(&mut self) {
        if let Some(p) = self.pending_json_progress.take() {
            self.last_json_progress = Some(Instant::now());
            self.json(&serde_json::to_value(&p).unwrap_or_default());
        }
    }

    fn plain_line(&self, segment: &str, done: u64, total: u64) -> String {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let (rate, eta) = match self.session_start {
            Some((t, base)) => {
                let r = rate_mb_s(done.saturating_sub(base), t.elapsed());
                let eta = if r > 0.0 {
                    format!("{:.0}s", (total.saturating_sub(done)) as f64 / 1e6 / r)
                } else {
                    "?".to_string()
                };
                (r, eta)
            }
            None => (0.0, "?".to_string()),
        };
        format!(
            "nx: progress {pct:5.1}% {}/{} (segment {segment}) {rate:.1} MB/s eta {eta}",
            mib(done),
            mib(total)
        )
    }

    fn setup_bars(&mut self, data_bytes: u64, segments: &[proto::session::SegmentProgress]) {
        self.clear_bars();
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:32.cyan/blue}] {bytes:>10}/{total_bytes:<10} {decimal_bytes_per_sec:>12} eta {eta:>4} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let overall = mp.add(ProgressBar::new(data_bytes));
        overall.set_style(style.clone());
        overall.set_prefix("total");
        self.segs = segments
            .iter()
            .map(|s| {
                let b = mp.add(ProgressBar::new(s.data_bytes));
                b.set_style(style.clone());
                b.set_prefix(s.name.clone());
                (s.name.clone(), b)
            })
            .collect();
        self.overall = Some(overall);
        self.mp = Some(mp);
    }

    fn clear_bars(&mut self) {
        if let Some(o) = self.overall.take() {
            o.finish();
        }
        for (_, b) in self.segs.drain(..) {
            if !b.is_finished() {
                b.finish();
            }
        }
        self.mp = None;
    }

    /// End of output: flush what is pending and remove the bars.
    pub fn finish(&mut self) {
        self.flush_json_progress();
        self.clear_bars();
    }
}

/// The engine's events, rendered as they come.
impl ProgressSink for Renderer {
    fn event(&mut self, ev: &EngineEvent) {
        self.show(ev);
    }
}
