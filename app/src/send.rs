//! `minipacs send` and `minipacs echo`: a storescu/echoscu equivalent.
//!
//! Files and folders (recursively) are scanned first, reading only each
//! file's meta group, so that the progress bar knows the total and each
//! association proposes exactly the (SOP class, transfer syntax) pairs its
//! files need, at most 128 per association. Objects are sent as they are
//! stored: no transcoding, data set bytes streamed from the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::part10::{self, Part10Info};
use dimse::command::status;
use dimse::scu::{ScuAssociation, ScuOptions};
use dimse::uid;

/// Presentation contexts one association can carry.
const MAX_CONTEXTS: usize = 128;

/// Where to send and as whom.
#[derive(Clone)]
pub struct Peer {
    /// host name or address
    pub host: String,
    /// TCP port
    pub port: u16,
    /// AE titles and timeout
    pub scu: ScuOptions,
    /// TLS, when the peer speaks DICOM over TLS
    pub tls: Option<ClientTls>,
}

/// A sender's TLS: configuration and the name the server's certificate
/// must carry.
#[derive(Clone)]
pub struct ClientTls {
    /// rustls configuration (roots, optional client certificate)
    pub config: Arc<rustls::ClientConfig>,
    /// name to verify the server certificate against
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// A connection to the peer, plain or TLS.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerStream for T {}

/// The sender's connection type: one code path for plain and TLS.
pub type Connection = Box<dyn PeerStream>;

/// One file to send.
#[derive(Debug)]
struct Item {
    path: PathBuf,
    info: Part10Info,
}

/// The outcome of a send.
#[derive(Debug, Default)]
pub struct SendReport {
    /// objects the peer stored (success or warning status)
    pub stored: usize,
    /// objects that failed, with the reason
    pub failed: Vec<(PathBuf, String)>,
    /// files found in folders that are not Part-10 files
    pub skipped: Vec<(PathBuf, String)>,
    /// data set bytes sent
    pub bytes: u64,
    /// wall time
    pub elapsed: Duration,
}

async fn connect(peer: &Peer) -> anyhow::Result<Connection> {
    connect_to(&peer.host, peer.port, peer.scu.timeout, peer.tls.as_ref()).await
}

/// Connects to `host`:`port` (TCP_NODELAY), then with TLS when given one,
/// each step within `timeout`. Used by the sender and by C-MOVE.
pub async fn connect_to(
    host: &str,
    port: u16,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> anyhow::Result<Connection> {
    let addr = format!("{host}:{port}");
    let stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
    let stream = tokio::time::timeout(timeout, connector.connect(tls.server_name.clone(), stream))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake with {addr}: timed out"))?
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let session = stream.get_ref().1;
    tracing::debug!(
        version = ?session.protocol_version(),
        suite = ?session.negotiated_cipher_suite().map(|s| s.suite()),
        "TLS established"
    );
    Ok(Box::new(stream))
}

/// Sends a C-ECHO and returns its status.
pub async fn echo(peer: &Peer) -> anyhow::Result<u16> {
    let stream = connect(peer).await?;
    let proposals = [(
        uid::VERIFICATION.to_string(),
        uid::IMPLICIT_VR_LE.to_string(),
    )];
    let mut assoc = ScuAssociation::request(stream, &peer.scu, &proposals).await?;
    let code = assoc.echo().await?;
    assoc.release().await?;
    Ok(code)
}

/// Collects the files named by `paths` (folders recursively, in name order).
fn collect(paths: &[PathBuf], report: &mut SendReport) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
                let entry = entry?;
                if !entry.file_type().is_file() {
                    continue;
                }
                match part10::read_meta(entry.path()) {
                    Ok(info) => items.push(Item {
                        path: entry.path().to_path_buf(),
                        info,
                    }),
                    Err(e) => report
                        .skipped
                        .push((entry.path().to_path_buf(), e.to_string())),
                }
            }
        } else {
            // A file named explicitly must be sendable.
            match part10::read_meta(path) {
                Ok(info) => items.push(Item {
                    path: path.clone(),
                    info,
                }),
                Err(e) => report.failed.push((path.clone(), e.to_string())),
            }
        }
    }
    Ok(items)
}

/// Proposed (SOP class, transfer syntax) pairs and the files that use them.
type Batch<'a> = (Vec<(String, String)>, &'a [Item]);

/// Splits items into association batches of at most 128 distinct
/// (SOP class, transfer syntax) pairs, keeping file order.
fn batches(items: &[Item]) -> Vec<Batch<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let pair = (
            item.info.sop_class.to_string(),
            item.info.transfer_syntax.to_string(),
        );
        if pairs.contains(&pair) {
            continue;
        }
        if pairs.len() == MAX_CONTEXTS {
            out.push((std::mem::take(&mut pairs), &items[start..i]));
            start = i;
        }
        pairs.push(pair);
    }
    if start < items.len() {
        out.push((pairs, &items[start..]));
    }
    out
}

/// Sends every Part-10 file under `paths`. Per-object failures are in the
/// report; an error is returned only when no association could be made.
pub async fn send(peer: &Peer, paths: &[PathBuf]) -> anyhow::Result<SendReport> {
    let started = Instant::now();
    let mut report = SendReport::default();
    let items = collect(paths, &mut report)?;
    let total: u64 = items.iter().map(|i| i.info.data_len).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for (proposals, batch) in batches(&items) {
        let mut next = 0;
        // An association that fails mid-batch costs its current object;
        // the rest of the batch goes on a new association.
        while next < batch.len() {
            let stream = connect(peer).await?;
            let mut assoc = ScuAssociation::request(stream, &peer.scu, &proposals).await?;
            let mut broken = false;
            for item in &batch[next..] {
                next += 1;
                bar.set_message(format!("{}", report.stored + report.failed.len() + 1));
                match send_one(&mut assoc, item, &bar).await {
                    Ok(()) => {
                        report.stored += 1;
                        report.bytes += item.info.data_len;
                    }
                    Err(e) => {
                        let why = match e {
                            SendOneError::Object(why) => why,
                            SendOneError::Association(e) => {
                                broken = true;
                                format!("association failed: {e}")
                            }
                        };
                        bar.suspend(|| eprintln!("{}: {why}", item.path.display()));
                        report.failed.push((item.path.clone(), why));
                        if broken {
                            break;
                        }
                    }
                }
            }
            if !broken {
                assoc.release().await?;
            }
        }
    }
    bar.finish_and_clear();
    report.elapsed = started.elapsed();
    Ok(report)
}

enum SendOneError {
    /// This object failed; the association goes on.
    Object(String),
    /// The association failed.
    Association(anyhow::Error),
}

async fn send_one(
    assoc: &mut ScuAssociation<Connection>,
    item: &Item,
    bar: &ProgressBar,
) -> Result<(), SendOneError> {
    let info = &item.info;
    let Some(ctx) = assoc.context_for(info.sop_class.as_str(), info.transfer_syntax.as_str())
    else {
        bar.inc(info.data_len);
        return Err(SendOneError::Object(format!(
            "the peer accepted no presentation context for SOP class {} in transfer syntax {}",
            info.sop_class, info.transfer_syntax
        )));
    };
    let file = File::open(&item.path)
        .and_then(|mut f| f.seek(SeekFrom::Start(info.data_offset)).map(|_| f))
        .map_err(|e| SendOneError::Object(format!("cannot read: {e}")))?;
    let padding = info.padding();
    let mut data = file.take(info.data_len).chain(padding);
    let result = assoc
        .store(
            ctx,
            &info.sop_class,
            &info.sop_instance,
            &mut data,
            info.data_len + padding.len() as u64,
            |n| bar.inc(n),
        )
        .await;
    match result {
        Ok((code, _)) if status::is_stored(code) => Ok(()),
        Ok((code, comment)) => Err(SendOneError::Object(format!(
            "status {code:04X}{}",
            comment.map(|c| format!(" ({c})")).unwrap_or_default()
        ))),
        Err(e) => Err(SendOneError::Association(e.into())),
    }
}

/// A one-line summary for the end of a send.
pub fn summary_line(report: &SendReport) -> String {
    let secs = report.elapsed.as_secs_f64();
    let mb = report.bytes as f64 / 1e6;
    format!(
        "sent {} object(s), {:.1} MB in {:.2} s ({:.1} MB/s); {} failed; {} skipped (not DICOM Part 10)",
        report.stored,
        mb,
        secs,
        if secs > 0.0 { mb / secs } else { 0.0 },
        report.failed.len(),
        report.skipped.len()
    )
}
