//! Networking: the TCP listeners (plain and TLS), connection bounds, and
//! the wiring of a configuration into a running receiver.

pub mod server;
pub mod slots;
pub mod throttle;

use crate::index::writer::Recorder;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, LiveConfig};
use crate::service::ServiceEvent;
use crate::services::{Receiver, Stats};
use crate::shutdown::{Shutdown, StopSignals};
use crate::store::{Store, StoreOptions};
use crate::tls::{ServerTlsFiles, TlsMaterial, TlsPolicy, TlsReloader};
use dimse::ae::AeTitle;
use dimse::negotiation::{AcceptPolicy, Allowed};
use server::{Listener, PortSettings, ServerLimits, SharedBounds};

/// The listening sockets (and the activity LED), opened before privileges
/// are dropped.
#[derive(Debug, Default)]
pub struct Sockets {
    /// plain DICOM
    pub plain: Option<std::net::TcpListener>,
    /// DICOM over TLS
    pub tls: Option<std::net::TcpListener>,
    /// the activity LED's brightness file
    pub led: Option<std::fs::File>,
}

impl Sockets {
    /// Binds the ports the configuration asks for.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        let bind = |port: u16| -> anyhow::Result<std::net::TcpListener> {
            let socket = std::net::TcpListener::bind((config.bind, port))
                .with_context(|| format!("binding {}:{port}", config.bind))?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        };
        Ok(Sockets {
            plain: config.listen_plain.then(|| bind(config.port)).transpose()?,
            tls: config
                .tls
                .files()
                .map(|_| bind(config.tls.port))
                .transpose()?,
            led: config
                .activity_led
                .as_deref()
                .and_then(crate::service::ActivityLed::open),
        })
    }
}

/// Where the TLS listener's certificates come from.
pub enum TlsFeed {
    /// No TLS listener.
    None,
    /// This process reads the files itself and watches them.
    Files(ServerTlsFiles),
    /// The privileged keeper reads them and sends each new set.
    Keeper {
        /// the first set
        first: TlsMaterial,
        /// the files' policy
        policy: TlsPolicy,
        /// later sets
        updates: mpsc::Receiver<TlsMaterial>,
    },
}

/// One receiver, as whoever starts it hands it over: the single process
/// (started as a normal user) and the privilege-separated worker (started
/// by the root keeper) build this and nothing else of the service.
pub struct Service {
    /// the configuration to start with
    pub config: Config,
    /// the listening sockets (and the LED), already bound
    pub sockets: Sockets,
    /// the store and log folders, already open
    pub folders: crate::handover::Folders,
    /// where the TLS listener's certificates come from
    pub tls: TlsFeed,
    /// the event sink (systemd, directly or through the keeper); the
    /// service holds its senders only until it has stopped, so the sink
    /// sees the channel close when the service is done
    pub events: mpsc::Sender<ServiceEvent>,
    /// configurations to apply while serving (from the drop folder)
    pub config_updates: mpsc::Receiver<Config>,
}

/// Runs a receiver in this process until it is stopped, on a runtime of its
/// own, and returns once every task of it has ended (see [`crate::shutdown`]).
///
/// `start` builds the [`Service`]; it may spawn what feeds it (a drop
/// folder watcher, the channel from the keeper) on the [`Shutdown`] it is
/// given, which stops and waits for them with the rest. SIGINT and SIGTERM
/// are taken over before `start` runs. A stop comes from the first of them,
/// or from anything calling [`Shutdown::stop`] (a restart).
pub fn serve_in_process<F, Fut>(start: F) -> anyhow::Result<()>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Service>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let mut signals = StopSignals::new().context("taking over SIGINT and SIGTERM")?;
        let shutdown = Shutdown::new();
        let result = match start(shutdown.clone()).await {
            Ok(service) => service.run(&shutdown, &mut signals).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Failed to start: stop whatever had been started already.
            shutdown.drain(Duration::from_secs(1), signals.recv()).await;
        }
        result
    });
    // Every task has ended. Blocking work cut off by the bound (a look at
    // the drop folder) is not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

impl Service {
    /// Opens the store and serves on the sockets until a stop signal or
    /// [`Shutdown::stop`], telling `events` how it goes; then drains: no new
    /// connections, idle associations aborted, objects in flight finished
    /// within `shutdown_timeout` (or until a second signal), the rest
    /// dropped. Every task it starts is a task of `shutdown`.
    pub async fn run(self, shutdown: &Shutdown, signals: &mut StopSignals) -> anyhow::Result<()> {
        let Service {
            config,
            sockets,
            folders,
            tls: tls_feed,
            events,
            mut config_updates,
        } = self;
        let config = &config;
        let crate::handover::Folders {
            store: store_dir,
            store_lock,
            logs,
        } = folders;
        let (store, swept) = Store::open_in(store_dir, store_lock, store_options(config)?)?;
        if swept > 0 {
            info!(swept, "removed temp files left by an earlier crash");
        }
        let free = store
            .free_space()
            .map(|(bytes, pct)| format!("{:.1} GB ({pct:.1} %)", bytes as f64 / 1e9))
            .unwrap_or_else(|e| e.to_string());
        let store = Arc::new(store);
        // Before any association is accepted: the index is level with the
        // files from the first C-STORE on, and nothing else writes to it
        // meanwhile (see crate::index::catchup).
        let index = open_index(
            Arc::clone(&store),
            config.index_file.clone(),
            forward_rules(config),
            events.clone(),
        )
        .await;
        let recorder = index.as_ref().and_then(|index| {
            let started = store
                .root()
                .try_clone()
                .and_then(|root| Recorder::start(Arc::clone(index), root));
            match started {
                Ok(recorder) => Some(Arc::new(recorder)),
                Err(e) => {
                    tracing::error!(error = %e, "index writer unavailable: objects are stored but not indexed until a restart");
                    None
                }
            }
        });
        let stats = Arc::new(Stats::default());
        let budget = crate::logs::Budget {
            max_bytes: config.log_max_bytes,
            files: crate::logs::Budget::DEFAULT.files,
        };
        let audit = match logs.as_ref().map(|l| {
            l.try_clone()
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(crate::logs::Audit::open_in(l, budget)?))
        }) {
            Some(Ok(a)) => Some(Arc::new(a)),
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "audit trail unavailable");
                None
            }
            None => None,
        };
        let bounds = SharedBounds::new(limits(config)?);
        let led = sockets
            .led
            .map(|f| Arc::new(crate::service::ActivityLed::new(f)));
        let peers = Arc::new(crate::retrieve::Peers::new(config.peer.clone()));
        let commitments = index.as_ref().map(|index| {
            Arc::new(crate::commitment::Commitments::new(
                Arc::clone(index),
                recorder.clone(),
                Arc::clone(&peers),
                audit.clone(),
                config.aetitle.clone(),
                Duration::from_secs(config.dimse_timeout),
            ))
        });
        let receiver = Arc::new(Receiver {
            store: Arc::clone(&store),
            stats: Arc::clone(&stats),
            audit: audit.clone(),
            led,
            index,
            recorder,
            stop: shutdown.token(),
            max_find_results: std::sync::atomic::AtomicUsize::new(config.max_find_results),
            peers,
            dimse_timeout: Duration::from_secs(config.dimse_timeout),
            commitments: commitments.clone(),
        });
        // Retention tells the forwarder when the store waits for the queue.
        let room = Arc::new(crate::retention::RoomWanted::default());
        // Store and forward: a worker per destination, from the index's
        // queue (which the catch-up above has already filled for files it
        // found).
        let forwarder = match (&receiver.index, store.root().try_clone()) {
            (Some(index), Ok(root)) => match crate::forward::Forwarder::new(
                Arc::clone(&room),
                Arc::clone(&stats.bytes_received),
                Arc::clone(index),
                Arc::new(root),
                Arc::clone(&receiver.peers),
                audit.clone(),
                config.aetitle.clone(),
                Duration::from_secs(config.dimse_timeout),
                shutdown.clone(),
            ) {
                Ok(forwarder) => Some(Arc::new(forwarder)),
                Err(e) => {
                    tracing::error!(error = %e, "forwarder thread: nothing is forwarded until a restart");
                    None
                }
            },
            (Some(_), Err(e)) => {
                tracing::error!(error = %e, "store folder: forwarding unavailable until a restart");
                None
            }
            (None, _) => {
                if !config.forward.is_empty() {
                    tracing::error!(
                        "the index is unavailable: nothing is forwarded until a restart"
                    );
                }
                None
            }
        };
        let listener_for = |tls: Option<Arc<TlsReloader>>| -> anyhow::Result<Arc<Listener>> {
            let is_tls = tls.is_some();
            Ok(Arc::new(Listener {
                shared: Arc::clone(&receiver),
                settings: std::sync::RwLock::new(port_settings(config, is_tls)?),
                tls,
                bounds: bounds.clone(),
            }))
        };
        // The listeners and whether each is the TLS one, for live changes.
        let mut live: Vec<(Arc<Listener>, bool)> = Vec::new();

        if let Some(socket) = sockets.plain {
            let socket = TcpListener::from_std(socket)?;
            info!(
                aetitle = %config.aetitle, addr = %socket.local_addr()?, tls = false,
                store = %config.output_directory.display(), layout = ?config.layout,
                fsync = config.fsync, free = %free, "listening"
            );
            let listener = listener_for(None)?;
            live.push((Arc::clone(&listener), false));
            shutdown.spawn(server::serve(socket, listener, shutdown.clone()));
        }
        if let Some(socket) = sockets.tls {
            let (first, policy, updates, files) = match tls_feed {
                TlsFeed::None => anyhow::bail!("a TLS port without TLS material"),
                TlsFeed::Files(files) => (
                    TlsMaterial::read(&files).context("TLS configuration")?,
                    files.policy(),
                    None,
                    Some(files),
                ),
                TlsFeed::Keeper {
                    first,
                    policy,
                    updates,
                } => (first, policy, Some(updates), None),
            };
            let (reloader, cert) = TlsReloader::new(&first, policy).context("TLS configuration")?;
            let reloader = Arc::new(reloader);
            set_peer_tls(&receiver, &first);
            let socket = TcpListener::from_std(socket)?;
            let aetitle = config.port_aetitle(true);
            info!(
                %aetitle, addr = %socket.local_addr()?, tls = true,
                subject = %cert.subject, serial = %cert.serial, not_after = %cert.not_after,
                peer_cert = ?policy.peer_cert, cipher_preference = ?policy.cipher_preference,
                store = %config.output_directory.display(), free = %free, "listening"
            );
            let target = Arc::clone(&reloader);
            let notify = events.clone();
            let peers_of = Arc::clone(&receiver);
            let apply = move |material: TlsMaterial, why: &str| {
                let _ = notify.try_send(ServiceEvent::Reloading);
                if crate::tls::apply_logged(&target, &material, why) {
                    set_peer_tls(&peers_of, &material);
                }
                let _ = notify.try_send(ServiceEvent::Reloaded);
            };
            match (files, updates) {
                (Some(files), _) => {
                    shutdown.spawn(crate::tls::watch_files(
                        files,
                        Duration::from_secs(config.tls.reload_check),
                        shutdown.token(),
                        apply,
                    ));
                }
                (None, Some(updates)) => {
                    shutdown.spawn(apply_from_keeper(updates, shutdown.token(), apply));
                }
                (None, None) => {}
            }
            let listener = listener_for(Some(reloader))?;
            live.push((Arc::clone(&listener), true));
            shutdown.spawn(server::serve(socket, listener, shutdown.clone()));
        }
        if let Some(forwarder) = &forwarder {
            // After the TLS peers' client configuration is set above.
            forwarder.apply(
                forward_rules(config),
                config.aetitle.clone(),
                Duration::from_secs(config.dimse_timeout),
                Duration::from_secs(config.commitment_timeout),
            );
        }
        // Retention: off unless [retention] is set (its task idles then, so
        // that a live change can turn it on).
        let retention = receiver.index.as_ref().map(|index| {
            Arc::new(crate::retention::Retention::new(
                Arc::clone(index),
                Arc::clone(&store),
                audit.clone(),
                config.retention.clone(),
                Arc::clone(&room),
            ))
        });
        if let Some(retention) = &retention {
            shutdown.spawn(crate::retention::run(
                Arc::clone(retention),
                shutdown.token(),
            ));
        }
        if let Some(commitments) = &commitments {
            shutdown.spawn(crate::commitment::deliver_reports(
                Arc::clone(commitments),
                shutdown.token(),
            ));
        }
        let _ = events.send(ServiceEvent::Ready).await;
        shutdown.spawn(crate::service::heartbeat(events.clone(), shutdown.token()));
        shutdown.spawn(report_status(
            Arc::clone(&stats),
            Arc::clone(&store),
            Outbound {
                forwarder: forwarder.clone(),
                retention: retention.clone(),
            },
            audit.clone(),
            logs.map(Arc::new),
            events.clone(),
            shutdown.token(),
        ));
        loop {
            tokio::select! {
                _ = signals.recv() => break,
                _ = shutdown.stopped() => break,
                Some(new) = config_updates.recv() => {
                    let _ = events.send(ServiceEvent::Reloading).await;
                    apply_live(&new, &live, &bounds, &store, forwarder.as_deref());
                    if let Some(commitments) = &commitments {
                        commitments.set_calling(
                            new.aetitle.clone(),
                            Duration::from_secs(new.dimse_timeout),
                        );
                    }
                    if let Some(retention) = &retention {
                        retention.set_policy(new.retention.clone());
                    }
                    let _ = events.send(ServiceEvent::Reloaded).await;
                }
            }
        }
        shutdown.stop();
        let _ = events.send(ServiceEvent::Stopping).await;
        // The event sink is a task of the shutdown too: it ends when the
        // last sender (each held by a task that ends on stop) is gone.
        drop(events);
        drop(config_updates);
        let bound = bounds.limits().shutdown_timeout;
        info!(
            tasks = shutdown.running(),
            shutdown_timeout = bound.as_secs(),
            "stopping: no new connections, idle associations aborted, objects in flight finish, retrieves stop offering objects"
        );
        let outcome = shutdown.drain(bound, signals.recv()).await;
        info!(?outcome, "stopped");
        Ok(())
    }
}

/// Opens the store's index and brings it level with the files, on a
/// blocking thread, telling `events` how far a long catch-up is. An index
/// that cannot be opened at all (a read-only or full disk) leaves the
/// receiver storing without one: the files are the truth, and the next
/// start catches up.
async fn open_index(
    store: Arc<Store>,
    index_file: std::path::PathBuf,
    rules: Vec<crate::index::queue::Rule>,
    events: mpsc::Sender<ServiceEvent>,
) -> Option<Arc<crate::index::Index>> {
    use crate::index::catchup;
    let work = move || -> Result<crate::index::Index, crate::index::IndexError> {
        let root = store.root();
        let shown = catchup::display_location(root, &index_file);
        let started = std::time::Instant::now();
        let (index, anew) = catchup::open_for_store(root, &index_file)?;
        index.set_synced(store.options().fsync)?;
        // The files the catch-up finds are queued like any other.
        index.set_forward_rules(rules);
        if let Some(why) = &anew {
            info!(index = %shown.display(), why = %why, "indexing the store's files anew");
        }
        let mut progress = catchup::Progress::new(|line: &str| {
            let _ = events.try_send(ServiceEvent::Status(line.to_string()));
        });
        let report = catchup::catch_up(&index, root, &index_file, &mut progress)?;
        info!(
            index = %shown.display(), files = report.files_seen, indexed = report.indexed,
            dropped = report.dropped, not_indexable = report.not_indexable,
            ms = started.elapsed().as_millis() as u64, "index level with the store"
        );
        Ok(index)
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(index)) => Some(Arc::new(index)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "index unavailable: objects are stored but not indexed until a restart");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "index catch-up did not finish: storing without an index");
            None
        }
    }
}

/// Replaces the status file's contents (not atomically: it is rewritten
/// every few seconds, and a torn one is only a stale status line).
fn write_status(folder: &crate::dirfd::Folder, text: &str) -> std::io::Result<()> {
    use nix::fcntl::OFlag;
    use std::io::Write;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW;
    folder
        .open_file(crate::logs::STATUS_FILE, flags, 0o644)?
        .write_all(text.as_bytes())
}

/// Applies certificates the keeper sends until the stop.
async fn apply_from_keeper(
    mut updates: mpsc::Receiver<TlsMaterial>,
    stop: CancellationToken,
    apply: impl Fn(TlsMaterial, &str),
) {
    loop {
        let material = tokio::select! {
            _ = stop.cancelled() => return,
            next = updates.recv() => match next {
                Some(material) => material,
                None => return,
            },
        };
        apply(material, "new certificate from the keeper");
    }
}

/// The services an `[[allow]]` entry grants: all when it names none.
fn grants_of(services: Option<&[crate::config::Grant]>) -> dimse::negotiation::Grants {
    use crate::config::Grant;
    let Some(services) = services else {
        return dimse::negotiation::Grants::ALL;
    };
    dimse::negotiation::Grants {
        store: services.contains(&Grant::Store),
        find: services.contains(&Grant::Find),
        get: services.contains(&Grant::Get),
        r#move: services.contains(&Grant::Move),
    }
}

/// Builds the client configuration for TLS `[[peer]]`s from the server's
/// material (our certificate is our client certificate too).
fn set_peer_tls(receiver: &Receiver, material: &TlsMaterial) {
    match crate::tls::peer_client_config(material) {
        Ok(config) => receiver.peers.set_tls(Some(Arc::new(config))),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS for [[peer]] connections");
            receiver.peers.set_tls(None);
        }
    }
}

/// What the live keys set in the running receiver, made in one place for
/// the start and for [`apply_live`]. The destructure names every field of
/// [`LiveConfig`] (no `..`): a live key added there does not compile until
/// it is applied here.
struct Applied {
    plain: PortSettings,
    tls: PortSettings,
    limits: ServerLimits,
    store: StoreOptions,
    max_find_results: usize,
    peers: Vec<crate::config::PeerEntry>,
    forward: Vec<crate::index::queue::Rule>,
}

/// The `[[forward]]` rules as the index applies them.
fn forward_rules(config: &Config) -> Vec<crate::index::queue::Rule> {
    crate::forward::rules_of(&config.forward)
}

fn applied(config: &Config) -> anyhow::Result<Applied> {
    let live = config.live();
    let ae_titles = [
        AeTitle::new(live.port_aetitle(false)).context("aetitle")?,
        AeTitle::new(live.port_aetitle(true)).context("tls.aetitle")?,
    ];
    let LiveConfig {
        aetitle: _,     // in `ae_titles`
        tls_aetitle: _, // in `ae_titles`
        max_pdu,
        accept_private_sop_classes,
        max_find_results,
        allow,
        peer,
        forward,
        retention: _,          // applied by the service (see `Service::run`)
        commitment_timeout: _, // read with `forward`
        dimse_timeout,
        acse_timeout,
        max_associations,
        max_associations_per_peer,
        evict_idle_after,
        max_pending_connections,
        shutdown_timeout,
        layout,
        fsync,
        overwrite,
        free_space_reserve_percent,
    } = live;
    let allow = allow
        .iter()
        .map(|a| {
            Ok(Allowed {
                aetitle: AeTitle::new(&a.aetitle).context("allow.aetitle")?,
                host: a.host,
                cert_name: a.cert_name.clone(),
                grants: grants_of(a.services.as_deref()),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [plain, tls] = ae_titles.map(|ae_title| PortSettings {
        policy: AcceptPolicy {
            ae_title,
            max_pdu,
            accept_private_sop_classes,
            allow: allow.clone(),
            // C-FIND is answered from the index (a C-FIND while it is
            // unavailable fails with a status, not at negotiation).
            find: true,
            // C-MOVE and C-GET likewise.
            retrieve: true,
            // Storage commitment, both ways (answered from the index, like
            // C-FIND: without one an N-ACTION fails with a status).
            commitment: true,
        },
        dimse_timeout: Duration::from_secs(dimse_timeout),
    });
    Ok(Applied {
        plain,
        tls,
        limits: ServerLimits {
            max_associations,
            max_associations_per_peer,
            evict_idle_after: Duration::from_secs(evict_idle_after),
            max_pending: max_pending_connections,
            acse_timeout: Duration::from_secs(acse_timeout),
            shutdown_timeout: Duration::from_secs(shutdown_timeout),
        },
        store: StoreOptions {
            // Read at start-up only: `Store::set_options` refuses another.
            root: config.output_directory.clone(),
            layout,
            fsync,
            reserve_percent: free_space_reserve_percent,
            overwrite,
        },
        max_find_results,
        peers: peer,
        forward: crate::forward::rules_of(&forward),
    })
}

fn store_options(config: &Config) -> anyhow::Result<StoreOptions> {
    Ok(applied(config)?.store)
}

fn limits(config: &Config) -> anyhow::Result<ServerLimits> {
    Ok(applied(config)?.limits)
}

/// The settings of the plain or the TLS port under `config`.
fn port_settings(config: &Config, is_tls: bool) -> anyhow::Result<PortSettings> {
    let applied = applied(config)?;
    Ok(if is_tls { applied.tls } else { applied.plain })
}

/// Applies a configuration that needs no restart (the caller checked with
/// [`Config::restart_reason`]): every key of [`LiveConfig`] takes effect
/// for what starts from now on; associations in flight keep what they
/// began with.
fn apply_live(
    new: &Config,
    live: &[(Arc<Listener>, bool)],
    bounds: &SharedBounds,
    store: &Store,
    forwarder: Option<&crate::forward::Forwarder>,
) {
    let Applied {
        plain,
        tls,
        limits,
        store: options,
        max_find_results,
        peers,
        forward,
    } = match applied(new) {
        Ok(applied) => applied,
        Err(e) => {
            // Only a configuration that skipped validation gets here.
            tracing::warn!(error = %format!("{e:#}"), "configuration not applied");
            return;
        }
    };
    for (listener, is_tls) in live {
        listener.set_settings(if *is_tls { tls.clone() } else { plain.clone() });
        // The listeners share one receiver; setting it twice is harmless.
        listener
            .shared
            .max_find_results
            .store(max_find_results, std::sync::atomic::Ordering::Relaxed);
        listener.shared.peers.set(peers.clone());
    }
    bounds.set_limits(limits);
    if let Some(forwarder) = forwarder {
        forwarder.apply(
            forward,
            new.aetitle.clone(),
            Duration::from_secs(new.dimse_timeout),
            Duration::from_secs(new.commitment_timeout),
        );
    }
    if let Err(e) = store.set_options(options) {
        tracing::warn!(error = e, "storage options not applied");
    }
    info!(aetitle = %new.aetitle, "configuration applied without a restart");
}

/// What leaves the store: the forwarder and retention, for the status line.
#[derive(Clone)]
struct Outbound {
    forwarder: Option<Arc<crate::forward::Forwarder>>,
    retention: Option<Arc<crate::retention::Retention>>,
}

impl Outbound {
    /// The queue's and retention's clauses of the status line (blocking:
    /// the queue is counted in the index).
    fn status_suffix(&self) -> String {
        let queue = self
            .forwarder
            .as_ref()
            .map(|f| f.summary())
            .unwrap_or_default();
        let retention = self
            .retention
            .as_ref()
            .map(|r| r.status_suffix())
            .unwrap_or_default();
        queue + &retention
    }
}

/// Sends a status line every few seconds when it changes, and keeps it in
/// the status file of the log folder (when there is one) for the field log
/// bundle, with the log writers' health.
async fn report_status(
    stats: Arc<Stats>,
    store: Arc<Store>,
    outbound: Outbound,
    audit: Option<Arc<crate::logs::Audit>>,
    log_folder: Option<Arc<crate::dirfd::Folder>>,
    events: mpsc::Sender<ServiceEvent>,
    stop: CancellationToken,
) {
    let mut last = String::new();
    let mut last_report = String::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // Audit records the updater left for us (crate::logs::spool).
    let spool = Arc::new(crate::logs::spool::Spool::default());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let (Some(folder), Some(audit)) = (&log_folder, &audit) {
            let (folder, audit, spool) =
                (Arc::clone(folder), Arc::clone(audit), Arc::clone(&spool));
            let _ = tokio::task::spawn_blocking(move || spool.drain(&folder, &audit)).await;
        }
        let free = store
            .free_space()
            .map(|(bytes, pct)| format!("{:.1} GB free ({pct:.0} %)", bytes as f64 / 1e9))
            .unwrap_or_else(|_| "free space unknown".into());
        let logs = crate::logs::LogHealth::now(audit.as_deref());
        let sources = outbound.clone();
        let queue = tokio::task::spawn_blocking(move || sources.status_suffix())
            .await
            .unwrap_or_default();
        let line = format!("{}; {free}{queue}{}", stats.summary(), logs.status_suffix());
        let report = logs.report();
        if (&line, &report) != (&last, &last_report) {
            if events
                .send(ServiceEvent::Status(line.clone()))
                .await
                .is_err()
            {
                return;
            }
            let stamped = format!(
                "{}  {line}\n{report}\n",
                crate::timestamp::rfc3339(std::time::SystemTime::now())
            );
            if let Some(folder) = &log_folder {
                let folder = Arc::clone(folder);
                let _ = tokio::task::spawn_blocking(move || write_status(&folder, &stamped)).await;
            }
            last = line;
            last_report = report;
        }
    }
}
