//! The field log bundle: one bounded `.tar.gz` a technician carries away
//! (a USB stick, a dropped trigger file), with everything needed to
//! diagnose the device without logging into it.
//!
//! Bounded, because it is written to the same small card or a small stick;
//! planned before it is written, so the newest lines are always in and
//! `MANIFEST.txt` says exactly what was cut; written atomically, so a
//! half-written bundle never has the final name.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::redaction::redact_config;
use super::rotation::{line_start_at_or_after, rotation_index};
use super::{LogsError, AUDIT_FILE, KEEPER_LOG_FILE, LOG_FILE};
use crate::durable::{Replace, Staged};
use crate::timestamp::rfc3339;

/// What [`collect_bundle`] puts in the bundle. Owned so the caller can build
/// it from a snapshot of the running service.
#[derive(Debug, Clone)]
pub struct BundleInputs {
    /// Folder of `minipacs.log*`.
    pub log_dir: PathBuf,
    /// Folder of `audit.jsonl*` (may be the same as `log_dir`).
    pub audit_dir: PathBuf,
    /// The effective configuration as TOML; secrets are redacted on the way
    /// in.
    pub config_text: String,
    /// The minipacs version string.
    pub version: String,
    /// The board profile's name.
    pub board_name: String,
    /// The board profile's text, if there is one.
    pub board_profile: Option<String>,
    /// Store roots, for free space and entry counts.
    pub store_paths: Vec<PathBuf>,
    /// A recent free-form service status.
    pub status: String,
    /// Upper bound on the size of the `.tar.gz`.
    pub max_bytes: u64,
}

impl BundleInputs {
    /// The default bundle budget: 50 MiB, which fits any USB stick and the
    /// default log and audit budgets several times over.
    pub const DEFAULT_MAX_BYTES: u64 = 50 << 20;
    /// The smallest bundle budget accepted.
    pub const MIN_MAX_BYTES: u64 = 64 << 10;
}

impl Default for BundleInputs {
    fn default() -> Self {
        BundleInputs {
            log_dir: PathBuf::new(),
            audit_dir: PathBuf::new(),
            config_text: String::new(),
            version: String::new(),
            board_name: String::new(),
            board_profile: None,
            store_paths: Vec::new(),
            status: String::new(),
            max_bytes: BundleInputs::DEFAULT_MAX_BYTES,
        }
    }
}

/// What [`collect_bundle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    /// The bundle's final path.
    pub path: PathBuf,
    /// Member names, in archive order (`MANIFEST.txt` first).
    pub members: Vec<String>,
    /// Size of the `.tar.gz` on disk.
    pub compressed_bytes: u64,
    /// Size of the tar stream inside it.
    pub uncompressed_bytes: u64,
    /// One line per file truncated, left out or unreadable (also in
    /// `MANIFEST.txt`); empty when everything fit.
    pub cut: Vec<String>,
}

/// A tar block; headers and padding are counted in whole blocks.
const BLOCK: u64 = 512;
/// The most of any system file (os-release, device tree, ...) we read.
const SYSTEM_FILE_CAP: u64 = 64 << 10;
/// Below this much room a log tail is not worth including.
const MIN_TAIL: u64 = 4 << 10;
/// The most store entries counted before giving up (a flat store can be huge).
const MAX_COUNT: u64 = 1_000_000;

/// One member planned for the archive.
struct Member {
    name: String,
    body: Body,
    mtime: u64,
}

enum Body {
    Text(Vec<u8>),
    /// `len` bytes of `file` from `start`.
    File {
        file: File,
        start: u64,
        len: u64,
    },
}

impl Member {
    fn len(&self) -> u64 {
        match &self.body {
            Body::Text(t) => t.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

/// A log or audit file found on disk, opened before planning so rotations
/// during collection cannot change what we read.
struct Found {
    name: String,
    file: File,
    len: u64,
    modified: SystemTime,
    index: u32,
}

/// Bytes a member of `len` bytes takes in the tar stream.
fn tar_cost(len: u64) -> u64 {
    BLOCK + len.div_ceil(BLOCK) * BLOCK
}

/// Writes one bounded `.tar.gz` field log bundle to `out` (through a temp
/// file beside it and a rename, so a half-written bundle never has the
/// final name) and says what is in it.
///
/// Members: `MANIFEST.txt`, `versions.txt`, `board.txt`, `disk.txt`,
/// `status.txt`, `config.toml` (secrets redacted), then `logs/<file>` for
/// every service log and audit file, newest first. The tar stream is
/// planned to fit `max_bytes` with room for gzip's worst case, so the
/// `.tar.gz` never exceeds it: when the logs do not fit, the newest files
/// go in whole, the next keeps its newest lines, older ones are left out,
/// and `MANIFEST.txt` says so.
pub fn collect_bundle(out: &Path, inputs: &BundleInputs) -> Result<BundleSummary, LogsError> {
    if inputs.max_bytes < BundleInputs::MIN_MAX_BYTES {
        return Err(LogsError::BundleTooSmall {
            max_bytes: inputs.max_bytes,
            min: BundleInputs::MIN_MAX_BYTES,
        });
    }
    let now = SystemTime::now();
    let now_secs = unix_secs(now);
    let mut cut = Vec::new();

    let texts = [
        ("versions.txt", versions_text(&inputs.version)),
        (
            "board.txt",
            board_text(&inputs.board_name, inputs.board_profile.as_deref()),
        ),
        ("disk.txt", disk_text(inputs)),
        (
            "status.txt",
            format!("collected: {}\n\n{}\n", rfc3339(now), inputs.status),
        ),
        ("config.toml", redact_config(&inputs.config_text)),
    ];
    let mut found = find_log_files(&inputs.log_dir, LOG_FILE, &mut cut);
    found.extend(find_log_files(&inputs.log_dir, KEEPER_LOG_FILE, &mut cut));
    found.extend(find_log_files(&inputs.audit_dir, AUDIT_FILE, &mut cut));
    // Newest first: by modification time, then by rotation index.
    found.sort_by(|a, b| b.modified.cmp(&a.modified).then(a.index.cmp(&b.index)));

    // Room for the tar stream: the budget less gzip's worst case (stored
    // blocks cost 5 bytes per 64 KiB, plus header and trailer), less the
    // end-of-archive blocks and a reserve for the manifest, whose size is
    // only known at the end (each of its lines is well under 200 bytes; a
    // manifest longer than its reserve, from thousands of files, is cut).
    let gzip_margin = inputs.max_bytes / 1024 + 1024;
    let tar_budget = inputs.max_bytes - gzip_margin;
    let manifest_estimate = 2048 + 200 * (found.len() as u64 + texts.len() as u64);
    let manifest_reserve = tar_cost(manifest_estimate.min(tar_budget / 4));
    let mut room = tar_budget.saturating_sub(2 * BLOCK + manifest_reserve);

    let mut members = Vec::new();
    for (name, text) in texts {
        let mut bytes = text.into_bytes();
        if tar_cost(bytes.len() as u64) > room {
            if room < 2 * BLOCK {
                cut.push(format!(
                    "{name}: left out, {} bytes (bundle budget)",
                    bytes.len()
                ));
                continue;
            }
            let keep = usize::try_from((room - BLOCK) / BLOCK * BLOCK).unwrap_or(0);
            cut.push(format!(
                "{name}: truncated to its first {keep} of {} bytes (bundle budget)",
                bytes.len()
            ));
            bytes.truncate(keep);
        }
        room = room.saturating_sub(tar_cost(bytes.len() as u64));
        members.push(Member {
            name: name.to_string(),
            body: Body::Text(bytes),
            mtime: now_secs,
        });
    }
    let mut notes = Vec::new();
    for f in found {
        let name = format!("logs/{}", f.name);
        if tar_cost(f.len) <= room {
            room -= tar_cost(f.len);
            notes.push((name.clone(), String::new()));
            members.push(Member {
                name,
                body: Body::File {
                    file: f.file,
                    start: 0,
                    len: f.len,
                },
                mtime: unix_secs(f.modified),
            });
            continue;
        }
        let avail = room.saturating_sub(BLOCK) / BLOCK * BLOCK;
        if avail < MIN_TAIL {
            cut.push(format!("{name}: left out, {} bytes (bundle budget)", f.len));
            continue;
        }
        let start = match line_start_at_or_after(&f.file, f.len - avail, f.len) {
            Ok(start) => start,
            Err(e) => {
                cut.push(format!("{name}: unreadable: {e}"));
                continue;
            }
        };
        let len = f.len - start;
        room = room.saturating_sub(tar_cost(len));
        let note = format!(
            "truncated: kept the newest {len} of {} bytes, cut the oldest {start}",
            f.len
        );
        cut.push(format!("{name}: {note}"));
        notes.push((name.clone(), note));
        members.push(Member {
            name,
            body: Body::File {
                file: f.file,
                start,
                len,
            },
            mtime: unix_secs(f.modified),
        });
    }

    let mut manifest = manifest_text(inputs, now, &members, &notes, &cut).into_bytes();
    let reserve_len = usize::try_from(manifest_reserve - BLOCK).unwrap_or(0);
    manifest.truncate(reserve_len);
    members.insert(
        0,
        Member {
            name: "MANIFEST.txt".to_string(),
            body: Body::Text(manifest),
            mtime: now_secs,
        },
    );
    let uncompressed_bytes = members.iter().map(|m| tar_cost(m.len())).sum::<u64>() + 2 * BLOCK;

    let compressed_bytes = write_bundle(out, &mut members)?;
    Ok(BundleSummary {
        path: out.to_path_buf(),
        members: members.into_iter().map(|m| m.name).collect(),
        compressed_bytes,
        uncompressed_bytes,
        cut,
    })
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Finds and opens `name`, `name.1`, ... in `dir`. Unreadable ones are noted
/// in `cut`; a missing folder simply has no files.
fn find_log_files(dir: &Path, name: &str, cut: &mut Vec<String>) -> Vec<Found> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(index) = rotation_index(name, file_name) else {
            continue;
        };
        let opened = File::open(entry.path()).and_then(|file| {
            let meta = file.metadata()?;
            Ok((file, meta))
        });
        match opened {
            Ok((file, meta)) if meta.is_file() => found.push(Found {
                name: file_name.to_string(),
                file,
                len: meta.len(),
                modified: meta.modified().unwrap_or(UNIX_EPOCH),
                index,
            }),
            Ok(_) => {}
            Err(e) => cut.push(format!("logs/{file_name}: unreadable: {e}")),
        }
    }
    found
}

/// Streams the planned members into a temp file beside `out`, then commits
/// it durably under that name ([`crate::durable`]). Returns the compressed
/// size.
fn write_bundle(out: &Path, members: &mut [Member]) -> Result<u64, LogsError> {
    // No exact mode: the drop folder may be FAT, which refuses a chmod;
    // the temp file's 0600 is what the bundle keeps elsewhere.
    let staged = Staged::create(out, ".minipacs-bundle-", None)?;
    let temp = staged.temp_path();
    let write_err = LogsError::io("write bundle", &temp);
    let gz = flate2::write::GzEncoder::new(
        io::BufWriter::new(staged.file()),
        flate2::Compression::default(),
    );
    let result = (|| -> io::Result<()> {
        let mut tar = tar::Builder::new(gz);
        for member in members.iter_mut() {
            let mut header = tar::Header::new_ustar();
            header.set_size(member.len());
            header.set_mode(0o640);
            header.set_mtime(member.mtime);
            header.set_entry_type(tar::EntryType::Regular);
            match &mut member.body {
                Body::Text(text) => tar.append_data(&mut header, &member.name, text.as_slice())?,
                Body::File { file, start, len } => {
                    file.seek(SeekFrom::Start(*start))?;
                    // Exactly `len` bytes even if the file shrank meanwhile
                    // (the tar header already promised them).
                    let data = (&*file).take(*len).chain(io::repeat(b'\n')).take(*len);
                    tar.append_data(&mut header, &member.name, data)?;
                }
            }
        }
        let gz = tar.into_inner()?;
        let mut buffered = gz.finish()?;
        buffered.flush()?;
        Ok(())
    })();
    result.map_err(write_err)?;
    let file = staged.commit(Replace::Allowed)?;
    file.metadata()
        .map(|m| m.len())
        .map_err(LogsError::io("stat bundle", out))
}

fn manifest_text(
    inputs: &BundleInputs,
    now: SystemTime,
    members: &[Member],
    notes: &[(String, String)],
    cut: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "minipacs field log bundle");
    let _ = writeln!(s, "created: {}", rfc3339(now));
    let _ = writeln!(s, "minipacs version: {}", one_line(&inputs.version, 100));
    let _ = writeln!(s, "budget: {} bytes for the .tar.gz", inputs.max_bytes);
    let _ = writeln!(s);
    let _ = writeln!(s, "members (name, bytes in this bundle, note):");
    let _ = writeln!(s, "  MANIFEST.txt  (this file)");
    for m in members {
        let note = notes
            .iter()
            .find(|(name, _)| *name == m.name)
            .map_or("", |(_, note)| note.as_str());
        let _ = write!(s, "  {}  {}", m.name, m.len());
        let _ = if note.is_empty() {
            writeln!(s)
        } else {
            writeln!(s, "  {note}")
        };
    }
    let _ = writeln!(s);
    if cut.is_empty() {
        let _ = writeln!(s, "nothing was cut");
    } else {
        let _ = writeln!(s, "cut to fit the budget, or unreadable:");
        for c in cut {
            let _ = writeln!(s, "  {}", one_line(c, 180));
        }
    }
    s
}

/// First line of `s`, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    s.lines().next().unwrap_or("").chars().take(max).collect()
}

/// Reads at most [`SYSTEM_FILE_CAP`] bytes of a small system file as text.
fn read_small(path: &str) -> Option<String> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|f| f.take(SYSTEM_FILE_CAP).read_to_end(&mut buf))
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn versions_text(version: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "minipacs {version}");
    let _ = writeln!(
        s,
        "target: {}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    let kernel = read_small("/proc/version")
        .map(|v| v.trim().to_string())
        .or_else(|| {
            let out = std::process::Command::new("uname")
                .arg("-a")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let _ = writeln!(s, "kernel: {kernel}");
    if let Some(up) = read_small("/proc/uptime") {
        let secs = up.split_whitespace().next().unwrap_or("?");
        let _ = writeln!(s, "uptime seconds: {secs}");
    }
    let _ = writeln!(s);
    match read_small("/etc/os-release").or_else(|| read_small("/usr/lib/os-release")) {
        Some(os) => {
            let _ = writeln!(s, "os-release:\n{}", os.trim_end());
        }
        None => {
            let _ = writeln!(s, "os-release: not found");
        }
    }
    s
}

fn board_text(name: &str, profile: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "board profile: {name}");
    // Through /sys, not /proc/device-tree: the unit's ProcSubset=pid hides
    // all of /proc but the processes.
    if let Some(model) = read_small("/sys/firmware/devicetree/base/model") {
        let _ = writeln!(
            s,
            "device-tree model: {}",
            model.trim_end_matches('\0').trim()
        );
    }
    let _ = writeln!(s);
    match profile {
        Some(text) => {
            let _ = writeln!(s, "profile text:\n{}", text.trim_end());
        }
        None => {
            let _ = writeln!(s, "profile text: none given");
        }
    }
    s
}

fn disk_text(inputs: &BundleInputs) -> String {
    let mut s = String::new();
    let mut seen: Vec<&Path> = Vec::new();
    let stores = inputs.store_paths.iter().map(|p| (p.as_path(), "store"));
    let logs = [
        (inputs.log_dir.as_path(), "logs"),
        (inputs.audit_dir.as_path(), "audit"),
    ];
    for (path, role) in stores.chain(logs) {
        if path.as_os_str().is_empty() || seen.contains(&path) {
            continue;
        }
        seen.push(path);
        let _ = writeln!(s, "{} ({role})", path.display());
        match nix::sys::statvfs::statvfs(path) {
            Ok(st) => {
                let frag = widen(st.fragment_size());
                let total = widen(st.blocks()) * frag;
                let free = widen(st.blocks_available()) * frag;
                let pct = if total == 0 {
                    0.0
                } else {
                    free as f64 * 100.0 / total as f64
                };
                let _ = writeln!(s, "  total: {total} bytes ({:.2} GiB)", gib(total));
                let _ = writeln!(
                    s,
                    "  free: {free} bytes ({:.2} GiB, {pct:.1}%) available to the service",
                    gib(free)
                );
                let _ = writeln!(
                    s,
                    "  inodes: {} total, {} available",
                    widen(st.files()),
                    widen(st.files_available())
                );
            }
            Err(e) => {
                let _ = writeln!(s, "  statvfs failed: {e}");
            }
        }
        if role == "store" {
            match count_entries(path) {
                Ok((visible, hidden, capped)) => {
                    let more = if capped { " (stopped counting)" } else { "" };
                    let _ = writeln!(
                        s,
                        "  top-level entries: {visible} (plus {hidden} hidden){more}"
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  cannot list: {e}");
                }
            }
        }
        let _ = writeln!(s);
    }
    if s.is_empty() {
        s.push_str("no paths given\n");
    }
    s
}

/// statvfs counts are 64 bits on some targets and 32 on others (32-bit
/// Raspberry Pi OS); a generic widening compiles on both without a cast.
fn widen<T: Into<u64>>(value: T) -> u64 {
    value.into()
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Counts (visible, hidden, capped) entries directly in `dir`, without
/// listing them: the bundle reports the store's shape, not its contents.
fn count_entries(dir: &Path) -> io::Result<(u64, u64, bool)> {
    let (mut visible, mut hidden) = (0u64, 0u64);
    for entry in fs::read_dir(dir)? {
        if visible + hidden >= MAX_COUNT {
            return Ok((visible, hidden, true));
        }
        let Ok(entry) = entry else { continue };
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            hidden += 1;
        } else {
            visible += 1;
        }
    }
    Ok((visible, hidden, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::redaction::REDACTED;
    use crate::logs::test_util::{noise, object};
    use crate::logs::{Audit, Budget, LogDir};
    use tracing_subscriber::fmt::MakeWriter;

    struct Unpacked {
        members: Vec<(String, Vec<u8>)>,
        tar_len: usize,
    }

    fn unpack(path: &Path) -> Unpacked {
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(File::open(path).expect("open"))
            .read_to_end(&mut tar_bytes)
            .expect("gunzip");
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let members = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("data");
                (name, data)
            })
            .collect();
        Unpacked {
            members,
            tar_len: tar_bytes.len(),
        }
    }

    fn member<'u>(u: &'u Unpacked, name: &str) -> &'u [u8] {
        &u.members
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1
    }

    const SECRET_CONFIG: &str = r#"
port = 104
password = "hunter2"
store = "/var/lib/minipacs"

[tls]
key = "/etc/x/privkey.pem"
cert = "/etc/x/fullchain.pem"

[upstream]
api_token = "tok-abc123"
client = { db-password = "inline-pw", host = "pacs.example" }

[[peers]]
ae = "CT1"
shared_secret = "s3cr3t-peer"
"#;

    fn inputs(dir: &Path) -> BundleInputs {
        let store = dir.join("store");
        fs::create_dir_all(store.join(".incoming")).expect("store");
        for n in 0..3 {
            fs::write(store.join(format!("obj{n}.dcm")), b"DICM").expect("obj");
        }
        BundleInputs {
            log_dir: dir.join("logs"),
            audit_dir: dir.join("logs"),
            config_text: SECRET_CONFIG.to_string(),
            version: "0.1.0 (test)".to_string(),
            board_name: "rpi4-bedside".to_string(),
            board_profile: Some("[board]\nname = \"rpi4-bedside\"\n".to_string()),
            store_paths: vec![store],
            status: "receiving; 3 associations today".to_string(),
            max_bytes: BundleInputs::DEFAULT_MAX_BYTES,
        }
    }

    #[test]
    fn bundle_has_every_member_and_no_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs = inputs(dir.path());
        let budget = Budget {
            max_bytes: 16 << 10,
            files: 4,
        };
        let logs = LogDir::open(&inputs.log_dir, budget).expect("logs");
        let audit = Audit::open(&inputs.audit_dir, budget).expect("audit");
        for n in 0..400 {
            logs.make_writer()
                .write_all(format!("log line {n} ..............................\n").as_bytes())
                .expect("write");
            audit.object(&object(n));
        }
        let out = dir.path().join("out/bundle.tar.gz");
        fs::create_dir_all(out.parent().expect("parent")).expect("out dir");
        let summary = collect_bundle(&out, &inputs).expect("bundle");
        assert_eq!(
            summary.compressed_bytes,
            fs::metadata(&out).expect("stat").len()
        );
        assert!(summary.cut.is_empty(), "{:?}", summary.cut);

        let u = unpack(&out);
        let names: Vec<&str> = u.members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, summary.members);
        assert_eq!(names[0], "MANIFEST.txt");
        for expected in [
            "versions.txt",
            "board.txt",
            "disk.txt",
            "status.txt",
            "config.toml",
            "logs/minipacs.log",
            "logs/minipacs.log.1",
            "logs/minipacs.log.3",
            "logs/audit.jsonl",
            "logs/audit.jsonl.3",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        // The log members are the files, byte for byte.
        assert_eq!(
            member(&u, "logs/minipacs.log"),
            fs::read(inputs.log_dir.join(LOG_FILE)).expect("read")
        );

        for secret in [
            "hunter2",
            "privkey.pem",
            "tok-abc123",
            "inline-pw",
            "s3cr3t-peer",
        ] {
            for (name, data) in &u.members {
                assert!(
                    !data.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} found in {name}"
                );
            }
        }
        let config = String::from_utf8_lossy(member(&u, "config.toml")).into_owned();
        let parsed: toml::Table = toml::from_str(&config).expect("still TOML");
        assert_eq!(parsed["password"].as_str(), Some(REDACTED));
        assert_eq!(parsed["tls"]["key"].as_str(), Some(REDACTED));
        assert_eq!(parsed["tls"]["cert"].as_str(), Some("/etc/x/fullchain.pem"));
        assert_eq!(parsed["port"].as_integer(), Some(104));
        assert_eq!(
            parsed["upstream"]["client"]["host"].as_str(),
            Some("pacs.example")
        );

        let text = |name| String::from_utf8_lossy(member(&u, name)).into_owned();
        assert!(text("versions.txt").starts_with("minipacs 0.1.0 (test)\n"));
        assert!(text("versions.txt").contains("kernel: "));
        assert!(text("board.txt").contains("rpi4-bedside"));
        assert!(
            text("disk.txt").contains("top-level entries: 3 (plus 1 hidden)"),
            "{}",
            text("disk.txt")
        );
        assert!(text("disk.txt").contains("free: "));
        assert!(text("status.txt").contains("3 associations today"));
        let manifest = text("MANIFEST.txt");
        for (name, data) in &u.members[1..] {
            assert!(
                manifest
                    .lines()
                    .any(|l| l == format!("  {name}  {}", data.len())),
                "{name} in {manifest}"
            );
        }
        assert!(manifest.contains("nothing was cut"));
    }

    #[test]
    fn bundle_respects_its_budget_with_oversized_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inputs = inputs(dir.path());
        inputs.max_bytes = 256 << 10;
        let budget = Budget {
            max_bytes: 2 << 20,
            files: 5,
        };
        let logs = LogDir::open(&inputs.log_dir, budget).expect("logs");
        let mut seed = 99;
        let mut last = String::new();
        for n in 0..20_000 {
            last = format!("line {n:06} {}", noise(&mut seed, 100));
            logs.make_writer()
                .write_all(format!("{last}\n").as_bytes())
                .expect("write");
        }
        let out = dir.path().join("bundle.tar.gz");
        let summary = collect_bundle(&out, &inputs).expect("bundle");
        let size = fs::metadata(&out).expect("stat").len();
        assert!(size <= inputs.max_bytes, "{size} > {}", inputs.max_bytes);
        assert!(summary.uncompressed_bytes <= inputs.max_bytes);
        assert!(!summary.cut.is_empty());

        let u = unpack(&out);
        assert_eq!(u.tar_len as u64, summary.uncompressed_bytes);
        // The newest lines are always there.
        let current = String::from_utf8_lossy(member(&u, "logs/minipacs.log")).into_owned();
        assert_eq!(current.lines().last(), Some(last.as_str()));
        // A truncated member keeps whole lines from its tail.
        let manifest = String::from_utf8_lossy(member(&u, "MANIFEST.txt")).into_owned();
        assert!(
            manifest.contains("truncated: kept the newest"),
            "{manifest}"
        );
        assert!(manifest.contains("left out"), "{manifest}");
        for (name, data) in u.members.iter().filter(|(n, _)| n.starts_with("logs/")) {
            let text = String::from_utf8_lossy(data);
            assert!(text.ends_with('\n'), "{name}");
            assert!(
                text.lines()
                    .all(|l| l.starts_with("line ") && l.len() == 112),
                "{name}"
            );
        }
        // Bounded but not starved: most of the budget carries log lines.
        assert!(summary.uncompressed_bytes > inputs.max_bytes / 2);
        let leftovers = fs::read_dir(dir.path())
            .expect("read dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".minipacs-bundle-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn bundle_rejects_a_budget_too_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inputs = inputs(dir.path());
        inputs.max_bytes = 1000;
        let err = collect_bundle(&dir.path().join("b.tar.gz"), &inputs).expect_err("too small");
        assert!(matches!(err, LogsError::BundleTooSmall { .. }));
    }
}
