//! The image file on the host: its head (parsed strictly before anything is sent), chunk
//! reads on demand (never the whole file in memory), and the local check that hashes every
//! segment while the transfer runs, so a corrupted file is refused naming the segment.

use bytes::Bytes;
use proto::image::{Header, ImageHead, ImageVerifier, HEADER_LEN, MAX_HEAD_LEN};
use proto::manifest::Manifest;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Block size of the local check's sequential read.
const CHECK_BLOCK: usize = 1 << 20;

/// Why an image file cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading image {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Why the local check could not run (not: the image is bad — that is [`CheckState::error`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot start the image check thread")]
    Spawn(#[source] std::io::Error),
    #[error("the shared image check is unusable (a thread panicked)")]
    Poisoned,
}

/// An opened image: the head and a handle for positioned reads.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
    head: Bytes,
    parsed: ImageHead,
    len: u64,
}

impl ImageFile {
    /// Open `path`, read and parse its head (header, manifest, signature slot) and check that
    /// the file is exactly as long as the manifest says.
    pub fn open(path: &Path) -> Result<ImageFile, ImageFileError> {
        let file = File::open(path).map_err(|source| ImageFileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let rd = |source| ImageFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: String| ImageFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let len = file.metadata().map_err(rd)?.len();
        if len < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "it is {len} bytes, shorter than the {HEADER_LEN}-byte header (truncated, or not an image)"
            )));
        }
        let mut header = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).map_err(rd)?;
        let h = Header::parse(&header).map_err(|e| invalid(e.to_string()))?;
        let head_len = usize::try_from(h.data_offset)
            .ok()
            .filter(|n| *n <= MAX_HEAD_LEN && *n >= HEADER_LEN)
            .ok_or_else(|| invalid(format!("head length {} is out of bounds", h.data_offset)))?;
        if len < head_len as u64 {
            return Err(invalid(format!(
                "it is {len} bytes, shorter than its own head ({head_len} bytes): truncated"
            )));
        }
        let mut head = vec![0u8; head_len];
        file.read_exact_at(&mut head, 0).map_err(rd)?;
        let parsed = ImageHead::parse(&head).map_err(|e| invalid(e.to_string()))?;
        let total = parsed.manifest.total_size;
        if len != total {
            let what = if len < total {
                "truncated"
            } else {
                "has trailing bytes"
            };
            return Err(invalid(format!(
                "it is {len} bytes but its manifest says {total}: the file {what}"
            )));
        }
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            head: Bytes::from(head),
            parsed,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn head(&self) -> Bytes {
        self.head.clone()
    }
    pub fn manifest(&self) -> &Manifest {
        &self.parsed.manifest
    }
    pub fn parsed_head(&self) -> &ImageHead {
        &self.parsed
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Read exactly `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }
}

/// Progress of the local check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckState {
    /// Segments (in table order) whose content was checked.
    pub verified_segments: usize,
    /// Every byte was checked.
    pub done: bool,
    /// The first failure, naming the segment where there is one.
    pub error: Option<String>,
}

/// The local check: a thread reads the image sequentially from the first segment to the end
/// and feeds [`ImageVerifier`]; its state is published on a watch channel. Clones watch the
/// same check.
#[derive(Debug, Clone)]
pub struct LocalCheck {
    rx: watch::Receiver<CheckState>,
}

impl LocalCheck {
    /// Start checking `img` in the background.
    pub fn start(img: Arc<ImageFile>) -> Result<LocalCheck, CheckError> {
        let (tx, rx) = watch::channel(CheckState::default());
        std::thread::Builder::new()
            .name("nx-check".into())
            .spawn(move || check_loop(&img, &tx))
            .map_err(CheckError::Spawn)?;
        Ok(LocalCheck { rx })
    }

    /// The state now.
    pub fn state(&self) -> CheckState {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<CheckState> {
        self.rx.clone()
    }
}

/// One local check shared by every transfer of the same image (`nx flash send` to several
/// targets): the first transfer that needs it starts it, the others watch the same thread, so
/// the file is hashed once whatever the number of targets.
#[derive(Debug, Clone, Default)]
pub struct SharedCheck(Arc<Mutex<Option<LocalCheck>>>);

impl SharedCheck {
    /// A slot with no check started yet.
    pub fn new() -> SharedCheck {
        SharedCheck::default()
    }

    /// The check of `img`, started now if no transfer started it yet.
    pub fn get_or_start(&self, img: &Arc<ImageFile>) -> Result<LocalCheck, CheckError> {
        let mut slot = self.0.lock().map_err(|_| CheckError::Poisoned)?;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = LocalCheck::start(img.clone())?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

fn check_loop(img: &ImageFile, tx: &watch::Sender<CheckState>) {
    let m = img.manifest();
    let mut v = ImageVerifier::new(m);
    let mut pos = m.data_offset();
    let mut buf = vec![0u8; CHECK_BLOCK];
    let mut last = 0usize;
    while pos < img.len {
        let n = (img.len - pos).min(CHECK_BLOCK as u64) as usize;
        if let Err(e) = img.file.read_exact_at(&mut buf[..n], pos) {
            tx.send_modify(|s| s.error = Some(format!("reading {}: {e}", img.path.display())));
            return;
        }
        if let Err(e) = v.update(&buf[..n]) {
            tx.send_modify(|s| s.error = Some(e.to_string()));
            return;
        }
        pos += n as u64;
        let now = v.verified_segments();
        if now != last {
            last = now;
            tx.send_modify(|s| s.verified_segments = now);
        }
    }
    match v.finish() {
        Ok(()) => tx.send_modify(|s| {
            s.verified_segments = m.segments.len();
            s.done = true;
        }),
        Err(e) => tx.send_modify(|s| s.error = Some(e.to_string())),
    }
}
