//! `nx image build`: pack a rootfs, add raw segments, lay out, sign, write atomically.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use proto::image::{decode_secret_key, layout_with, sign_manifest, ImageHead, LayoutOptions};
use proto::manifest::{
    is_all_zero, validate_segment_name, validate_version, Manifest, SegmentDigest, SegmentHasher,
    ALIGN, MAX_SEGMENTS,
};
use sha2::{Digest, Sha256};

use super::rootfs::{pack_squashfs, PackStats};
use super::{human_bytes, percent, read_full, read_small_text, CHUNK};

/// Arguments of `nx image build`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Build an image file.\n\n\
        --rootfs DIR is packed into a squashfs (zstd, read-only, mountable by the guest kernel) \
        stored as segment `rootfs`. Each --segment NAME=FILE adds FILE's bytes unchanged as \
        segment NAME ([a-z0-9_-]{1,32}). Segment order in the image: rootfs first, then the \
        --segment options in command-line order.\n\n\
        The output is deterministic: the same inputs give a byte-identical image on every run \
        and machine (owners 0:0, all times 0 or $SOURCE_DATE_EPOCH, sorted entries, no host \
        data). The image is written to a temporary file beside --out and renamed into place \
        at the end, so --out is never left half-written.",
    after_help = "Examples:\n  \
        nx image build --rootfs rootfs/ --version 1 --out build/nexus-os.img\n  \
        nx image build --rootfs rootfs/ --version 2.0.1 --out os.img \\\n      \
        --segment kernel=vmlinuz --segment initrd=initrd.img --sign keys/release\n  \
        SOURCE_DATE_EPOCH=1700000000 nx image build --rootfs rootfs/ --version 1 --out os.img"
)]
pub struct BuildArgs {
    /// Directory packed into the `rootfs` segment (squashfs).
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Image version string, [A-Za-z0-9._+~:-]{1,64} (e.g. 1, 2.0.1).
    #[arg(long, value_name = "V")]
    version: String,
    /// Output image path.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Add FILE as raw segment NAME (repeatable; kept in command-line order).
    #[arg(long = "segment", value_name = "NAME=FILE", value_parser = parse_segment_spec)]
    segments: Vec<(String, PathBuf)>,
    /// Sign the manifest with this secret key (from `nx image keygen`).
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    /// Anti-rollback counter written into the manifest: a device refuses images whose
    /// security version is below the highest one it has confirmed. Raise it with every release
    /// that fixes a security bug.
    #[arg(long, value_name = "N", default_value_t = 0)]
    security_version: u64,
    /// Do not add the dm-verity hash tree of the `rootfs` segment (segment `rootfs-verity`).
    /// Without it the device hashes the whole rootfs at every boot instead.
    #[arg(long)]
    no_verity: bool,
    /// How the rootfs squashfs stores its blocks: `stored` (default: uncompressed, so that
    /// `nx flash send` can send only what changed against the running image and compress on
    /// the wire) or `zstd` (smaller on disk, but every change reshuffles the compressed
    /// blocks).
    #[arg(long, value_name = "HOW", default_value = "stored", value_parser = ["stored", "zstd"])]
    rootfs_compression: String,
}

fn parse_segment_spec(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=FILE, got {s:?}"))?;
    validate_segment_name(name).map_err(|e| e.to_string())?;
    if file.is_empty() {
        return Err(format!("segment {name:?}: empty file path"));
    }
    Ok((name.to_string(), PathBuf::from(file)))
}

/// Everything `build_image` needs (the CLI fills it from [`BuildArgs`] and the environment).
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Directory packed into `rootfs`.
    pub rootfs: Option<PathBuf>,
    /// Image version string.
    pub version: String,
    /// Output path.
    pub out: PathBuf,
    /// Raw segments, in order.
    pub segments: Vec<(String, PathBuf)>,
    /// Secret key file to sign with.
    pub sign: Option<PathBuf>,
    /// Anti-rollback counter.
    pub security_version: u64,
    /// Add the dm-verity tree of segment `rootfs` (segment [`VERITY_SEGMENT`]).
    pub verity: bool,
    /// Timestamp written into the squashfs (0 unless `SOURCE_DATE_EPOCH` is set).
    pub mtime: u32,
    /// Compress the squashfs blocks (zstd) instead of storing them.
    pub rootfs_zstd: bool,
}

/// What `build_image` produced.
#[derive(Clone, Debug)]
pub struct BuildReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Whether the image is signed.
    pub signed: bool,
    /// SHA-256 of the whole file (what `sha256sum` prints).
    pub file_sha256: [u8; 32],
    /// What the rootfs held, if any.
    pub rootfs: Option<PackStats>,
    /// Why `rootfs` has no verity tree although one was asked for (too small, no rootfs).
    pub verity_skipped: Option<&'static str>,
}

/// The segment protected by dm-verity by default.
pub const VERITY_DATA_SEGMENT: &str = "rootfs";
/// The segment holding its hash tree.
pub const VERITY_SEGMENT: &str = "rootfs-verity";

/// The verity salt of a data segment: fixed per segment name (not derived from the content),
/// so builds stay deterministic and the hash tree of an update changes only where its data
/// blocks (and the levels above them) change — an update then sends only those hashes. The
/// salt is public by design (it is in the manifest); dm-verity's security rests on the signed
/// root hash.
fn verity_salt(segment: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"nexus dm-verity salt v2\0");
    h.update(segment.as_bytes());
    h.finalize().to_vec()
}

struct Source {
    name: String,
    label: String,
    file: File,
}

/// Build an image as described by `opts`. See the module docs.
pub fn build_image(opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    validate_version(&opts.version).context("--version")?;
    let mut names: Vec<&str> = Vec::new();
    if opts.rootfs.is_some() {
        names.push("rootfs");
    }
    for (name, _) in &opts.segments {
        validate_segment_name(name)?;
        if names.contains(&name.as_str()) {
            if name == "rootfs" && opts.rootfs.is_some() {
                bail!(
                    "--segment rootfs=… conflicts with --rootfs (which makes the rootfs segment)"
                );
            }
            bail!("segment {name:?} is given twice");
        }
        names.push(name);
    }
    if opts.verity && names.contains(&VERITY_SEGMENT) {
        bail!(
            "segment {VERITY_SEGMENT:?} is made by the build (the dm-verity tree of \
             {VERITY_DATA_SEGMENT:?}); rename yours or pass --no-verity"
        );
    }
    if names.is_empty() {
        bail!("nothing to build: pass --rootfs DIR and/or --segment NAME=FILE");
    }
    if names.len() > MAX_SEGMENTS {
        bail!(
            "{} segments given, an image holds at most {MAX_SEGMENTS}",
            names.len()
        );
    }

    let seed = match &opts.sign {
        Some(path) => {
            let text = read_small_text(path, 4096, "secret key")?;
            Some(
                decode_secret_key(&text)
                    .with_context(|| format!("secret key {}", path.display()))?,
            )
        }
        None => None,
    };

    let out_dir = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        bail!(
            "output directory {} does not exist; create it first",
            out_dir.display()
        );
    }
    let out_name = opts
        .out
        .file_name()
        .with_context(|| format!("--out {} has no file name", opts.out.display()))?
        .to_string_lossy()
        .into_owned();

    // Sources, rootfs first.
    let mut sources = Vec::new();
    let mut rootfs_stats = None;
    let _rootfs_tmp = match &opts.rootfs {
        Some(dir) => {
            check_out_not_inside(dir, &out_dir)?;
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{out_name}.rootfs."))
                .tempfile_in(&out_dir)
                .with_context(|| {
                    format!("cannot create a temporary file in {}", out_dir.display())
                })?;
            let stats = pack_squashfs(dir, tmp.as_file(), opts.mtime, opts.rootfs_zstd)?;
            rootfs_stats = Some(stats);
            let file = tmp.reopen().context("cannot reopen the packed rootfs")?;
            sources.push(Source {
                name: "rootfs".into(),
                label: format!("squashfs of {}", dir.display()),
                file,
            });
            Some(tmp)
        }
        None => None,
    };
    for (name, path) in &opts.segments {
        let file = File::open(path)
            .with_context(|| format!("segment {name:?}: cannot open {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("segment {name:?}: cannot stat {}", path.display()))?;
        if !meta.is_file() {
            bail!("segment {name:?}: {} is not a regular file", path.display());
        }
        sources.push(Source {
            name: name.clone(),
            label: path.display().to_string(),
            file,
        });
    }

    // Pass 1: digests (and the verity tree of the rootfs).
    let mut parts: Vec<(String, SegmentDigest)> = Vec::with_capacity(sources.len() + 1);
    let mut verity = Vec::new();
    let mut verity_skipped = None;
    let mut tree_source = None;
    for src in &mut sources {
        let want_tree = opts.verity && src.name == VERITY_DATA_SEGMENT;
        let d = digest_stream(&mut src.file, |_| Ok(()))
            .with_context(|| format!("segment {:?}: cannot read {}", src.name, src.label))?;
        if d.size == 0 {
            bail!(
                "segment {:?}: {} is empty; empty segments are not allowed",
                src.name,
                src.label
            );
        }
        parts.push((src.name.clone(), d.clone()));
        if want_tree {
            if proto::verity::data_blocks(d.size) < 2 {
                verity_skipped = Some("the rootfs is a single 4 KiB block");
                continue;
            }
            // A second read builds the tree.
            let salt = verity_salt(&src.name);
            src.file
                .seek(SeekFrom::Start(0))
                .with_context(|| format!("cannot rewind {}", src.label))?;
            let mut t = proto::verity::TreeBuilder::new(&salt);
            digest_stream(&mut src.file, |chunk| {
                t.update(chunk);
                Ok(())
            })
            .with_context(|| format!("segment {:?}: cannot read {}", src.name, src.label))?;
            let t = t.finish();
            let mut h = SegmentHasher::new();
            h.update(&t.bytes);
            parts.push((VERITY_SEGMENT.to_string(), h.finish()));
            verity.push(proto::manifest::Verity {
                data: src.name.clone(),
                hash: VERITY_SEGMENT.to_string(),
                salt,
                root_hash: t.root_hash,
            });
            tree_source = Some(t.bytes);
        }
    }
    if opts.verity && verity.is_empty() && verity_skipped.is_none() {
        verity_skipped = Some("the image has no rootfs segment");
    }

    let manifest = layout_with(
        &LayoutOptions {
            version: opts.version.clone(),
            security_version: opts.security_version,
            verity,
        },
        &parts,
    )
    .context("cannot lay out the image")?;
    let signature = seed.map(|s| sign_manifest(&s, &manifest.to_canonical_bytes()));
    let head = ImageHead::build(&manifest, signature).context("cannot build the image head")?;

    // Pass 2: write.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{out_name}."))
        .suffix(".tmp")
        .tempfile_in(&out_dir)
        .with_context(|| format!("cannot create a temporary file in {}", out_dir.display()))?;
    let mut w = SparseWriter {
        file: tmp.as_file(),
        pos: 0,
        file_pos: 0,
        sha: Sha256::new(),
    };
    let ctx = || format!("cannot write {}", tmp.path().display());
    w.write(&head.to_bytes()).with_context(ctx)?;
    let mut parts_iter = parts.iter();
    for src in sources.iter_mut() {
        let Some((name, expected)) = parts_iter.next() else {
            bail!("internal error: fewer segment digests than sources");
        };
        src.file
            .seek(SeekFrom::Start(0))
            .with_context(|| format!("segment {name:?}: cannot rewind {}", src.label))?;
        let d = digest_stream(&mut src.file, |chunk| w.write(chunk)).with_context(|| {
            format!("segment {name:?}: cannot copy {} into the image", src.label)
        })?;
        if &d != expected {
            bail!(
                "segment {name:?}: {} changed while the image was being built; run the build again",
                src.label
            );
        }
        let pad = w.pos.next_multiple_of(ALIGN) - w.pos;
        w.write(&vec![0u8; pad as usize]).with_context(ctx)?;
        if name == VERITY_DATA_SEGMENT {
            if let Some(tree) = &tree_source {
                // The tree segment follows its data segment.
                if parts_iter.next().map(|(n, _)| n.as_str()) != Some(VERITY_SEGMENT) {
                    bail!("internal error: the verity segment is not after {name:?}");
                }
                w.write(tree).with_context(ctx)?;
                let pad = w.pos.next_multiple_of(ALIGN) - w.pos;
                w.write(&vec![0u8; pad as usize]).with_context(ctx)?;
            }
        }
    }
    if w.pos != manifest.total_size {
        bail!(
            "internal error: wrote {} bytes, the manifest says {}",
            w.pos,
            manifest.total_size
        );
    }
    let file_sha256: [u8; 32] = w.sha.finalize().into();
    let f = tmp.as_file();
    f.set_len(manifest.total_size).with_context(ctx)?;
    f.sync_all().with_context(ctx)?;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(ctx)?;
    tmp.persist(&opts.out)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename the finished image to {}", opts.out.display()))?;
    if let Ok(d) = File::open(&out_dir) {
        // Make the rename durable; failure here does not make the image wrong.
        let _ = d.sync_all();
    }

    Ok(BuildReport {
        manifest,
        signed: signature.is_some(),
        file_sha256,
        rootfs: rootfs_stats,
        verity_skipped,
    })
}

/// Refuse `--out` inside `--rootfs`: the build's own temporary files would be packed.
fn check_out_not_inside(rootfs: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let r = fs::canonicalize(rootfs)
        .with_context(|| format!("cannot resolve --rootfs {}", rootfs.display()))?;
    let o = fs::canonicalize(out_dir)
        .with_context(|| format!("cannot resolve {}", out_dir.display()))?;
    if o.starts_with(&r) {
        bail!(
            "--out must not be inside --rootfs ({} is inside {}): the image would pack itself",
            o.display(),
            r.display()
        );
    }
    Ok(())
}

/// Stream `r` to the end in [`CHUNK`] pieces, hashing and handing each piece to `sink`.
fn digest_stream(
    r: &mut File,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<SegmentDigest> {
    let mut h = SegmentHasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_full(r, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        sink(&buf[..n])?;
        if n < buf.len() {
            break;
        }
    }
    Ok(h.finish())
}

/// Writes the image sequentially, hashing every byte but leaving all-zero 4 KiB blocks as
/// holes (the file is `set_len` to its full size at the end), so sparse segments stay sparse.
struct SparseWriter<'f> {
    file: &'f File,
    pos: u64,
    file_pos: u64,
    sha: Sha256,
}

impl SparseWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.sha.update(data);
        let block = ALIGN as usize;
        let mut i = 0;
        while i < data.len() {
            let end = |at: usize| (at + block).min(data.len());
            let zero = is_all_zero(&data[i..end(i)]);
            let mut j = end(i);
            while j < data.len() && is_all_zero(&data[j..end(j)]) == zero {
                j = end(j);
            }
            if !zero {
                let at = self.pos + i as u64;
                let mut f: &File = self.file;
                if self.file_pos != at {
                    f.seek(SeekFrom::Start(at))?;
                }
                f.write_all(&data[i..j])?;
                self.file_pos = self.pos + j as u64;
            }
            i = j;
        }
        self.pos += data.len() as u64;
        Ok(())
    }
}

/// Run `nx image build`.
pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v.trim().parse::<u32>().with_context(|| {
            format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds (0..=4294967295)")
        })?,
        _ => 0,
    };
    let opts = BuildOptions {
        rootfs: args.rootfs,
        version: args.version,
        out: args.out,
        segments: args.segments,
        sign: args.sign,
        security_version: args.security_version,
        verity: !args.no_verity,
        mtime,
        rootfs_zstd: args.rootfs_compression == "zstd",
    };
    let r = build_image(&opts)?;
    print_summary(&opts.out, &r);
    Ok(ExitCode::SUCCESS)
}

fn print_summary(out: &Path, r: &BuildReport) {
    let m = &r.manifest;
    say!(
        "built {} (version {}, security version {}, {}, {})",
        out.display(),
        m.version,
        m.security_version,
        human_bytes(m.total_size),
        if r.signed { "signed" } else { "unsigned" }
    );
    for v in &m.verity {
        say!(
            "  dm-verity: {} protected by {} (root hash {})",
            v.data,
            v.hash,
            hex::encode(v.root_hash)
        );
    }
    if let Some(why) = r.verity_skipped {
        say!("  dm-verity: none ({why}); the device hashes the whole rootfs at boot instead");
    }
    if let Some(s) = r.rootfs {
        say!(
            "  rootfs: {} files, {} dirs, {} symlinks, {} of file data",
            s.files,
            s.dirs,
            s.symlinks,
            human_bytes(s.file_bytes)
        );
    }
    say!(
        "  {:<12} {:>12} {:>12} {:>6}  sha256",
        "segment",
        "offset",
        "size",
        "data%"
    );
    for s in &m.segments {
        say!(
            "  {:<12} {:>12} {:>12} {:>6.1}  {}",
            s.name,
            s.offset,
            s.size,
            percent(s.data_bytes(), s.size),
            hex::encode(s.sha256)
        );
    }
    let content: u64 = m.segments.iter().map(|s| s.size).sum();
    say!(
        "  data: {} of {} segment bytes are non-zero ({:.1}%)",
        human_bytes(m.data_bytes()),
        human_bytes(content),
        percent(m.data_bytes(), content)
    );
    say!("  manifest id:  {}", hex::encode(m.id()));
    say!(
        "  image sha256: {} (whole-image hash in the manifest)",
        hex::encode(m.image_sha256)
    );
    say!("  file sha256:  {}", hex::encode(r.file_sha256));
}
