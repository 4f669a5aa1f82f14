//! The application's side of C-MOVE and C-GET: which stored files a
//! retrieve names (from the index), each opened at its data set through
//! the store's folder descriptor and streamed unchanged, and for a C-MOVE
//! the connection to its destination, a known `[[peer]]`.
//!
//! The `dimse` crate sends; this module only chooses what and where. The
//! index is read on a blocking thread that opens one file at a time and
//! hands it to a channel a few entries deep, so an answer of any size
//! holds a few open files and no object in memory; when the service stops,
//! it offers no more. A destination that is
//! not in `[[peer]]` gets A801 before anything is opened: no data leaves
//! the device for an AE title nobody configured.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dimse::ae::AeTitle;
use dimse::command::status;
use dimse::scp::{
    Failure, MoveDestination, MoveRetrieval, Outgoing, Retrieval, RetrieveRequest,
    SubOperationFailure,
};
use dimse::uid::Uid;
use nix::fcntl::OFlag;
use tokio::io::AsyncRead;

use crate::config::PeerEntry;
use crate::dirfd::Folder;
use crate::index::query::{self, Model};
use crate::index::retrieve::{Retrieve, Stored};
use crate::index::writer::Recorder;
use crate::index::Index;

/// Opened files the index thread may be ahead of the network by.
const OBJECT_CHANNEL: usize = 2;
/// How much of each data set the index thread reads when it opens the
/// file, and the size of each later read. A read on the runtime goes
/// through tokio's blocking pool, a thread handoff each way, and the
/// sender asks for one PDU at a time (16 KiB for dcmtk's peers): a
/// profile of C-GETs of 64 KiB objects spent most of the server's time
/// waking threads. With the head read ahead, an object up to this size
/// goes out with no handoff at all, and a larger one with one per this
/// many bytes. Held per retrieve: the heads in the channel and the one
/// being sent, plus one buffer for the rest.
const READ_AHEAD: usize = 128 * 1024;
/// Status of a C-MOVE that cannot reach its (known) destination, and of a
/// stored object that cannot be read: Refused, out of resources, unable to
/// perform sub-operations (PS3.4 C.4.2.1.5).
const UNABLE_TO_PERFORM: u16 = 0xA702;
/// Move Destination unknown (PS3.4 C.4.2.1.5).
const DESTINATION_UNKNOWN: u16 = 0xA801;

/// The known DICOM nodes (`[[peer]]`), replaced as a whole when the
/// configuration changes, and the TLS client configuration for those that
/// want TLS.
#[derive(Default)]
pub struct Peers {
    entries: RwLock<Vec<PeerEntry>>,
    tls: RwLock<Option<Arc<rustls::ClientConfig>>>,
}

impl Peers {
    /// The table as configured.
    pub fn new(entries: Vec<PeerEntry>) -> Peers {
        Peers {
            entries: RwLock::new(entries),
            tls: RwLock::default(),
        }
    }

    /// Takes a new table (a live configuration change).
    pub fn set(&self, entries: Vec<PeerEntry>) {
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = entries;
    }

    /// Takes the client configuration for TLS peers (at start and after
    /// each certificate reload).
    pub fn set_tls(&self, config: Option<Arc<rustls::ClientConfig>>) {
        *self
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    /// The `[[peer]]` entry of `aetitle`.
    pub(crate) fn find(&self, aetitle: &str) -> Option<PeerEntry> {
        self.entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|p| p.aetitle == aetitle)
            .cloned()
    }

    fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What a retrieve reads from.
pub struct Source {
    /// the index (each retrieve reads on a connection of its own)
    pub index: Arc<Index>,
    /// the index's writer, waited for before the selection (objects
    /// acknowledged before the request are in it)
    pub recorder: Option<Arc<Recorder>>,
    /// the service's stop: once it fires no more objects are offered, and
    /// those not offered count as failed in the final response
    pub stop: tokio_util::sync::CancellationToken,
    /// the store's root folder, through which files are opened
    pub root: Arc<Folder>,
}

/// Selects the objects of a C-GET or C-MOVE and starts the thread that
/// opens them one by one.
pub async fn select(source: &Source, request: &RetrieveRequest<'_>) -> Result<Retrieval, Failure> {
    let model = Model::of(request.sop_class.as_str()).ok_or_else(|| {
        Failure::new(
            status::SOP_CLASS_NOT_SUPPORTED,
            "not a retrieve model we answer",
        )
    })?;
    let query = query::parse(model, request.transfer_syntax.as_str(), request.identifier)?;
    let index = Arc::clone(&source.index);
    let recorder = source.recorder.clone();
    let stop = source.stop.clone();
    let root = Arc::clone(&source.root);
    let (tx, rx) = tokio::sync::mpsc::channel(OBJECT_CHANNEL);
    let (selected_tx, selected_rx) = tokio::sync::oneshot::channel();
    // SQLite and open(2) block: one blocking thread counts, then opens and
    // hands over one object at a time, and stops when the receiver is
    // dropped (cancel, association gone).
    tokio::task::spawn_blocking(move || {
        if let Some(recorder) = recorder {
            recorder.settle();
        }
        let selected = Retrieve::new(&index, &query)
            .and_then(|r| r.selection().map(|s| (r, s)))
            .map_err(|f| {
                Failure::new(
                    if f.status == status::IDENTIFIER_MISMATCH {
                        f.status
                    } else {
                        0xA701
                    },
                    f.comment,
                )
            });
        let retrieve = match selected {
            Ok((retrieve, selection)) => {
                if selected_tx.send(Ok(selection)).is_err() {
                    return;
                }
                retrieve
            }
            Err(failure) => {
                let _ = selected_tx.send(Err(failure));
                return;
            }
        };
        let mut stopped = false;
        let sent = retrieve.for_each(|stored| {
            // A service that is stopping offers no more objects: the
            // retrieve ends after those already handed over, and the rest
            // count as failed.
            if stop.is_cancelled() {
                stopped = true;
                return ControlFlow::Break(());
            }
            let item = open(&root, &stored);
            match tx.blocking_send(item) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        if stopped {
            tracing::info!(
                "retrieve: the service is stopping; the objects not offered yet count as failed"
            );
        }
        if let Err(failure) = sent {
            // The index failed mid-way: the objects not handed over are
            // counted as failed by the protocol side.
            tracing::warn!(error = %failure.comment, "retrieve: index read failed");
        }
    });
    let selection = selected_rx.await.map_err(|_| {
        Failure::new(
            status::UNABLE_TO_PROCESS,
            "the index thread ended before it counted",
        )
    })??;
    let presentations = selection
        .pairs
        .iter()
        .filter_map(|(class, ts)| Some((Uid::new(class)?, Uid::new(ts)?)))
        .collect();
    Ok(Retrieval {
        sub_operations: selection.count,
        presentations,
        objects: rx,
    })
}

/// Opens one stored object at its data set (blocking: the first
/// [`READ_AHEAD`] bytes are read here). The forwarder sends from it too.
pub(crate) fn open(root: &Folder, stored: &Stored) -> Result<Outgoing, SubOperationFailure> {
    let instance = Uid::new(&stored.sop_instance);
    let failed = |why: String| {
        SubOperationFailure::new(
            instance.clone(),
            Failure::new(UNABLE_TO_PERFORM, format!("{}: {why}", stored.path)),
        )
    };
    let file = root
        .open_file(&stored.path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, 0)
        .map_err(|e| failed(e.to_string()))?;
    let info = crate::part10::read_meta_of(&file).map_err(|e| failed(e.to_string()))?;
    let mut file = file;
    use std::io::Seek;
    use tokio::io::AsyncReadExt;
    file.seek(std::io::SeekFrom::Start(info.data_offset))
        .map_err(|e| failed(e.to_string()))?;
    // This runs on the index's blocking thread: the head is read here.
    let head_len = usize::try_from(info.data_len).map_or(READ_AHEAD, |n| n.min(READ_AHEAD));
    let mut head = vec![0; head_len];
    std::io::Read::read_exact(&mut file, &mut head)
        .map_err(|e| failed(format!("reading the data set: {e}")))?;
    let head = std::io::Cursor::new(head);
    let rest = info.data_len - head_len as u64;
    let padding = info.padding();
    let data: Pin<Box<dyn AsyncRead + Send>> = if rest == 0 {
        Box::pin(head.chain(padding))
    } else {
        let file = tokio::fs::File::from_std(file).take(rest);
        let file = tokio::io::BufReader::with_capacity(READ_AHEAD, file);
        Box::pin(head.chain(file).chain(padding))
    };
    Ok(Outgoing {
        length: info.data_len + padding.len() as u64,
        sop_class: info.sop_class,
        sop_instance: info.sop_instance,
        transfer_syntax: info.transfer_syntax,
        data,
    })
}

/// Selects a C-MOVE's objects and connects to its destination, which must
/// be a known peer.
pub async fn prepare_move(
    source: &Source,
    peers: &Peers,
    our_ae: &str,
    timeout: Duration,
    request: &RetrieveRequest<'_>,
) -> Result<MoveRetrieval, Failure> {
    let destination = request
        .move_destination
        .ok_or_else(|| Failure::new(DESTINATION_UNKNOWN, "no Move Destination"))?;
    let Some(peer) = peers.find(destination.as_str()) else {
        return Err(Failure::new(
            DESTINATION_UNKNOWN,
            format!("{destination} is not a known [[peer]]"),
        ));
    };
    let retrieval = select(source, request).await?;
    let transport = connect(&peer, peers, timeout).await.map_err(|e| {
        Failure::new(
            UNABLE_TO_PERFORM,
            format!(
                "cannot reach {} at {}:{}: {e:#}",
                peer.aetitle, peer.host, peer.port
            ),
        )
    })?;
    let called_ae = AeTitle::new(&peer.aetitle)
        .map_err(|e| Failure::new(DESTINATION_UNKNOWN, e.to_string()))?;
    let calling_ae =
        AeTitle::new(our_ae).map_err(|e| Failure::new(status::UNABLE_TO_PROCESS, e.to_string()))?;
    Ok(MoveRetrieval {
        retrieval,
        destination: MoveDestination {
            transport,
            called_ae,
            calling_ae,
        },
    })
}

/// Connects to a peer, with TLS when it says so.
pub(crate) async fn connect(
    peer: &PeerEntry,
    peers: &Peers,
    timeout: Duration,
) -> anyhow::Result<Box<dyn dimse::scp::Transport>> {
    let tls = if peer.tls {
        let config = peers
            .tls()
            .ok_or_else(|| anyhow::anyhow!("tls = true, but there is no [tls] key and cert"))?;
        Some(crate::send::ClientTls {
            config,
            server_name: crate::tls::server_name(&peer.host)?,
        })
    } else {
        None
    };
    let stream = crate::send::connect_to(&peer.host, peer.port, timeout, tls.as_ref()).await?;
    Ok(Box::new(stream))
}
