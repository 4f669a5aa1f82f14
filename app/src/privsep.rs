//! Privilege separation: a root *keeper* and an unprivileged *worker*.
//!
//! Started as root, `minipacs serve` binds its ports (104 and 2762 need
//! root), reads the TLS private key (Let's Encrypt keeps it root-only), and
//! starts itself again as the worker, handing it the listening sockets, its
//! store and log folders as open descriptors ([`crate::handover`]), and a
//! control socket. Before it reads a single byte from the network the worker
//! drops to the configured user and group (setgroups, setgid, setuid), sets
//! no_new_privs, and asks to die with its keeper. Every byte a peer sends is
//! parsed in the worker only.
//!
//! The keeper stays small: it sends the worker its configuration and TLS
//! material, re-reads the certificate files on SIGHUP or when they change
//! and sends the new set (after checking it), turns the worker's service
//! events into sd_notify messages (it is the service's main PID), and passes
//! stop requests on: the first SIGTERM or SIGINT (or a restart) becomes one
//! SIGTERM to the worker, a second one another (the worker then drops what
//! is left), and a worker still there `shutdown_timeout` plus a grace after
//! the first is killed. The worker runs in its own process group, so a
//! terminal's Ctrl-C reaches it only through the keeper. When the worker
//! dies, the keeper exits with its status.
//!
//! The worker runs the same [`crate::net::Service`] as the single process;
//! only what feeds it differs (here, the control channel).
//!
//! The control channel carries frames: a kind byte, a big-endian u32
//! length, the payload.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::unistd::{Gid, Group, Uid, User};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::dirfd::Folder;
use crate::handover::{Folders, Handed};
use crate::net::{Service, Sockets, TlsFeed};
use crate::service::{self, ServiceEvent};
use crate::shutdown::{Shutdown, StopSignals};
use crate::tls::{PemFile, TlsMaterial};

/// Environment variable that makes a process the worker; it names the
/// inherited file descriptors and the identity to drop to.
pub const WORKER_ENV: &str = "MINIPACS_WORKER";

/// Frame kinds of the control channel.
const FRAME_CONFIG: u8 = 1;
const FRAME_TLS: u8 = 2;
const FRAME_EVENT: u8 = 3;
/// The largest frame either side accepts (TLS material is a few KiB).
const MAX_FRAME: u32 = 4 << 20;

pub use crate::handover::Identity;

/// Resolves the configured user and group. The default user, `minipacs`,
/// is made by the package's sysusers.d file; on a machine without it (a
/// developer's), the worker runs as `nobody` and says so.
pub fn resolve_identity(user: &str, group: Option<&str>) -> anyhow::Result<Identity> {
    let found = User::from_name(user).with_context(|| format!("looking up user {user}"))?;
    let user_entry = match found {
        Some(u) => u,
        None if user == crate::config::DEFAULT_USER => {
            let nobody =
                User::from_name("nobody")?.context("neither user minipacs nor nobody exists")?;
            warn!(
                "user {user} does not exist (the package's sysusers.d file makes it); \
                 the worker runs as nobody"
            );
            nobody
        }
        None => bail!("user {user} does not exist"),
    };
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .with_context(|| format!("looking up group {name}"))?
                .with_context(|| format!("group {name} does not exist"))?
                .gid
        }
        None => user_entry.gid,
    };
    if user_entry.uid.is_root() {
        bail!("the worker must not run as root (user = \"{user}\")");
    }
    Ok(Identity {
        uid: user_entry.uid,
        gid,
    })
}

/// Lets `fd` survive the exec of the worker, and returns its number.
fn inheritable(fd: &impl AsFd) -> anyhow::Result<RawFd> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).context("clearing FD_CLOEXEC")?;
    Ok(fd.as_fd().as_raw_fd())
}

/// Runs the keeper: binds, reads keys, starts the worker, supervises it.
/// Called only when running as root.
pub fn run_keeper(
    config: Config,
    last_good: PathBuf,
    file_log: &crate::logs::FileLogHandle,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the keeper's runtime")?;
    // Take SIGTERM and SIGINT before anything else, so that a stop request
    // during start-up is passed on rather than killing the keeper alone.
    let stops = runtime.block_on(async { StopSignals::new() })?;
    // And SIGCHLD, before there is a worker: its end is seen, however early.
    let worker_exits = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
    })?;
    let who = resolve_identity(&config.user, config.group.as_deref())?;
    // Bind first: a start that fails here has changed nothing on disk.
    let sockets = Sockets::bind(&config)?;
    let handed = crate::handover::prepare(&config, who)?;
    crate::logs::attach_file_log(
        file_log,
        &handed.logs,
        crate::logs::KEEPER_LOG_FILE,
        config.log_max_bytes,
    );
    for change in &handed.changes {
        info!("{change}");
    }
    let tls_files = config.tls.files();
    let material = match &tls_files {
        Some(files) => {
            let material = TlsMaterial::read(files).context("TLS configuration")?;
            crate::tls::server_config(&material, files.policy()).context("TLS configuration")?;
            Some(material)
        }
        None => None,
    };
    let (keeper_end, worker_end) =
        std::os::unix::net::UnixStream::pair().context("control socket")?;
    let mut spec = format!(
        "control={},uid={},gid={}",
        inheritable(&worker_end)?,
        who.uid,
        who.gid
    );
    if let Some(s) = &sockets.plain {
        spec.push_str(&format!(",plain={}", inheritable(s)?));
    }
    if let Some(s) = &sockets.tls {
        spec.push_str(&format!(",tls={}", inheritable(s)?));
    }
    if let Some(f) = &sockets.led {
        spec.push_str(&format!(",led={}", inheritable(f)?));
    }
    // The worker's folders, by descriptor; its lock is a second descriptor
    // of the keeper's locked file, so both hold the one lock.
    let store_dir = handed.store.try_clone().context("store folder")?;
    let logs_dir = handed.logs.try_clone().context("log folder")?;
    let lock = handed.lock.try_clone().context("store lock")?;
    spec.push_str(&format!(
        ",store={},lock={},logs={}",
        inheritable(&store_dir)?,
        inheritable(&lock)?,
        inheritable(&logs_dir)?
    ));
    let exe = std::env::current_exe().context("finding our own executable")?;
    // The worker gets its own process group, so that a Ctrl-C on a terminal
    // reaches the keeper alone, which passes it on once: a second signal
    // straight to the worker would cut its graceful stop short.
    let mut child = std::process::Command::new(exe)
        .arg("serve")
        .env(WORKER_ENV, &spec)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the worker")?;
    info!(pid = child.id(), uid = %who.uid, gid = %who.gid, "worker started; keeper stays root to read certificates");
    // The worker has its copies; the keeper keeps none of the network,
    // and of the folders only the lock (held until the keeper ends).
    drop(worker_end);
    drop(sockets);
    drop((store_dir, logs_dir, lock));
    let Handed {
        store,
        lock: _store_lock,
        logs,
        changes: _,
    } = handed;
    drop((store, logs));

    let outcome = runtime.block_on(supervise(
        config,
        last_good.clone(),
        tls_files,
        material,
        keeper_end,
        Worker {
            child: &mut child,
            exits: worker_exits,
        },
        stops,
    ));
    let status = child.wait().context("waiting for the worker")?;
    info!(%status, "worker ended");
    if outcome? == Supervised::Restart {
        return Err(restart_on(&last_good));
    }
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// How supervision ended.
#[derive(Debug, PartialEq, Eq)]
enum Supervised {
    /// The worker exited.
    Ended,
    /// A new configuration was dropped: start again on it.
    Restart,
}

/// Replaces this process with `minipacs serve --config last_good` (the same
/// PID, so systemd sees a reload, not a crash). Returns only on failure.
pub fn restart_on(last_good: &Path) -> anyhow::Error {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow::anyhow!("restart: finding our executable: {e}"),
    };
    let err = std::process::Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(last_good)
        .exec();
    anyhow::anyhow!("restart on {}: {err}", last_good.display())
}

/// How long the keeper waits for a stopping worker beyond the worker's
/// own bound (`shutdown_timeout`) before it kills it.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

/// The keeper's side while the worker serves: sends it its configuration
/// and certificates, relays its events to systemd, watches the drop folder
/// and the certificate files, and passes stop requests on. Its own tasks
/// are tasks of its own [`Shutdown`], stopped and waited for when the
/// worker has gone.
async fn supervise(
    config: Config,
    last_good: PathBuf,
    tls_files: Option<crate::tls::ServerTlsFiles>,
    material: Option<TlsMaterial>,
    control: std::os::unix::net::UnixStream,
    mut worker: Worker<'_>,
    mut stops: StopSignals,
) -> anyhow::Result<Supervised> {
    let worker_pid = nix::unistd::Pid::from_raw(worker.child.id() as i32);
    control.set_nonblocking(true)?;
    let control = tokio::net::UnixStream::from_std(control)?;
    let (mut from_worker, mut to_worker) = tokio::io::split(control);
    write_frame(
        &mut to_worker,
        FRAME_CONFIG,
        toml::to_string(&config)?.as_bytes(),
    )
    .await?;
    if let Some(material) = &material {
        write_frame(&mut to_worker, FRAME_TLS, &encode_material(material)).await?;
    }

    let shutdown = Shutdown::new();
    let (events_tx, events_rx) = mpsc::channel(64);
    shutdown.spawn(service::notify_systemd(events_rx));
    // Frames are read by a task of their own: reading one is not
    // cancel-safe, and the loop below waits on other things too.
    let (frames_tx, mut frames) = mpsc::channel(16);
    shutdown.spawn(async move {
        while let Ok(frame) = read_frame(&mut from_worker).await {
            if frames_tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    let restart = Arc::new(AtomicBool::new(false));
    let (live_tx, mut live_rx) = mpsc::channel::<Config>(4);
    if let Some(dir) = config.drop_directory.clone() {
        let (running, restart, shutdown) = (config.clone(), Arc::clone(&restart), shutdown.clone());
        shutdown.clone().spawn(async move {
            if crate::drop::watch(dir, running, last_good, live_tx, shutdown.token()).await {
                restart.store(true, Ordering::Relaxed);
                shutdown.stop();
            }
        });
    }
    // Certificates: re-read on SIGHUP and on change, checked here, sent on.
    let (tls_tx, mut tls_rx) = mpsc::channel::<TlsMaterial>(4);
    if let Some(files) = tls_files {
        let policy = files.policy();
        let poll = Duration::from_secs(config.tls.reload_check);
        let notify = events_tx.clone();
        shutdown.spawn(crate::tls::watch_files(
            files,
            poll,
            shutdown.token(),
            move |m, why| {
                let _ = notify.try_send(ServiceEvent::Reloading);
                match crate::tls::server_config(&m, policy) {
                    Ok((_, s)) => {
                        info!(why, subject = %s.subject, serial = %s.serial, "new certificate; sending it to the worker");
                        let _ = tls_tx.try_send(m);
                    }
                    Err(e) => {
                        warn!(why, error = %e, "TLS reload failed; the previous certificate keeps serving");
                        let _ = notify.try_send(ServiceEvent::Reloaded);
                    }
                }
            },
        ));
    } else {
        drop(tls_tx);
    }
    let mut worker_bound = Duration::from_secs(config.shutdown_timeout) + WORKER_STOP_GRACE;
    // Set when the stop has been passed on: the worker is killed if it is
    // still there then.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut worker_gone = false;
    // The watchdog is pinged only while the worker's heartbeats arrive.
    loop {
        let sent = tokio::select! {
            frame = frames.recv(), if !worker_gone => match frame {
                Some((FRAME_EVENT, payload)) => {
                    if let Some(event) = ServiceEvent::decode(&String::from_utf8_lossy(&payload)) {
                        let _ = events_tx.send(event).await;
                    }
                    Ok(())
                }
                Some(_) => {
                    warn!("unexpected frame from the worker");
                    Ok(())
                }
                // The worker closed its end: it is stopping, and its exit
                // (SIGCHLD) ends the loop.
                None => {
                    worker_gone = true;
                    Ok(())
                }
            },
            _ = worker.exits.recv() => {
                // SIGCHLD: did the worker end (not just stop or continue)?
                if let Ok(Some(_)) = worker.child.try_wait() {
                    break;
                }
                Ok(())
            }
            Some(material) = tls_rx.recv() => {
                write_frame(&mut to_worker, FRAME_TLS, &encode_material(&material)).await
            }
            Some(new) = live_rx.recv() => {
                worker_bound = Duration::from_secs(new.shutdown_timeout) + WORKER_STOP_GRACE;
                write_frame(&mut to_worker, FRAME_CONFIG, toml::to_string(&new)?.as_bytes()).await
            }
            _ = stops.recv() => {
                if kill_at.is_some() {
                    info!("second stop request; passing it on: the worker drops what is left");
                    signal_worker(worker_pid, nix::sys::signal::Signal::SIGTERM);
                }
                shutdown.stop();
                Ok(())
            }
            _ = shutdown.stopped(), if kill_at.is_none() => {
                if restart.load(Ordering::Relaxed) {
                    let _ = events_tx.send(ServiceEvent::Reloading).await;
                }
                info!("stop requested; passing it to the worker");
                let _ = events_tx.send(ServiceEvent::Stopping).await;
                signal_worker(worker_pid, nix::sys::signal::Signal::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + worker_bound);
                Ok(())
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                warn!(secs = worker_bound.as_secs(), "the worker did not stop in time; killing it");
                signal_worker(worker_pid, nix::sys::signal::Signal::SIGKILL);
                kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                Ok(())
            }
        };
        if let Err(e) = sent {
            warn!(error = %e, "writing to the worker failed");
        }
    }
    // The keeper's own tasks end on the stop; the systemd notifier when
    // the last event sender is gone.
    drop(events_tx);
    shutdown.drain(Duration::from_secs(1), stops.recv()).await;
    Ok(if restart.load(Ordering::Relaxed) {
        Supervised::Restart
    } else {
        Supervised::Ended
    })
}

/// The worker process, and the SIGCHLD stream that tells when it may have
/// ended.
struct Worker<'a> {
    child: &'a mut std::process::Child,
    exits: tokio::signal::unix::Signal,
}

/// Resolves at `at`, or never.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn signal_worker(worker: nix::unistd::Pid, signal: nix::sys::signal::Signal) {
    if let Err(e) = nix::sys::signal::kill(worker, signal) {
        warn!(error = %e, ?signal, "cannot signal the worker");
    }
}

/// What the keeper handed the worker.
struct Inherited {
    control: OwnedFd,
    plain: Option<OwnedFd>,
    tls: Option<OwnedFd>,
    led: Option<OwnedFd>,
    store: OwnedFd,
    lock: OwnedFd,
    logs: OwnedFd,
    who: Identity,
}

/// Takes ownership of an inherited file descriptor named in [`WORKER_ENV`].
#[allow(unsafe_code)]
fn take_inherited_fd(fd: RawFd, socket: bool) -> anyhow::Result<OwnedFd> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("inherited descriptor {fd} is not open"))?;
    if target.to_string_lossy().starts_with("socket:") != socket {
        bail!("inherited descriptor {fd} is not what the keeper said");
    }
    // SAFETY: `fd` was opened by our keeper and inherited across exec (it
    // cleared FD_CLOEXEC for exactly these descriptors); /proc/self/fd just
    // showed it is open and of the kind expected. Nothing else in this process owns it: the
    // number was taken at exec time, so no later open() in this process can
    // have returned it, and `parse_inherited` calls this once per distinct
    // number, at start, before any other code could close it. The returned
    // OwnedFd is therefore its only owner.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn parse_inherited(spec: &str) -> anyhow::Result<Inherited> {
    let mut control = None;
    let mut plain = None;
    let mut tls = None;
    let mut led = None;
    let (mut store, mut lock, mut logs) = (None, None, None);
    let mut uid = None;
    let mut gid = None;
    let mut seen = Vec::new();
    for part in spec.split(',') {
        let (key, value) = part.split_once('=').context("malformed worker spec")?;
        let n: i64 = value.parse().context("malformed worker spec")?;
        match key {
            "uid" => uid = Some(Uid::from_raw(u32::try_from(n)?)),
            "gid" => gid = Some(Gid::from_raw(u32::try_from(n)?)),
            "control" | "plain" | "tls" | "led" | "store" | "lock" | "logs" => {
                let fd = RawFd::try_from(n)?;
                if fd < 3 || seen.contains(&fd) {
                    bail!("bad inherited descriptor {fd}");
                }
                seen.push(fd);
                let socket = matches!(key, "control" | "plain" | "tls");
                let owned = take_inherited_fd(fd, socket)?;
                match key {
                    "control" => control = Some(owned),
                    "plain" => plain = Some(owned),
                    "tls" => tls = Some(owned),
                    "led" => led = Some(owned),
                    "store" => store = Some(owned),
                    "lock" => lock = Some(owned),
                    _ => logs = Some(owned),
                }
            }
            _ => bail!("unknown key {key} in worker spec"),
        }
    }
    Ok(Inherited {
        control: control.context("no control socket")?,
        plain,
        tls,
        led,
        store: store.context("no store folder")?,
        lock: lock.context("no store lock")?,
        logs: logs.context("no log folder")?,
        who: Identity {
            uid: uid.context("no uid")?,
            gid: gid.context("no gid")?,
        },
    })
}

/// Drops to `who` for good: supplementary groups, group, user; then
/// no_new_privs, so nothing executed later can gain privileges; then checks
/// that root cannot be regained. Changing every user ID away from 0 clears
/// the permitted and effective capability sets.
pub fn drop_privileges(who: Identity) -> anyhow::Result<()> {
    nix::unistd::setgroups(&[who.gid]).context("setgroups")?;
    nix::unistd::setresgid(who.gid, who.gid, who.gid).context("setresgid")?;
    nix::unistd::setresuid(who.uid, who.uid, who.uid).context("setresuid")?;
    nix::sys::prctl::set_no_new_privs().context("no_new_privs")?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid().is_root() {
        bail!("privileges were not dropped");
    }
    Ok(())
}

/// Runs the worker: takes its sockets, drops privileges, then serves with
/// the configuration and certificates the keeper sends.
pub fn run_worker(spec: &str, file_log: &crate::logs::FileLogHandle) -> anyhow::Result<ExitCode> {
    let keeper = nix::unistd::getppid();
    let inherited = parse_inherited(spec)?;
    drop_privileges(inherited.who)?;
    // Die with the keeper; if it is already gone, stop now.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid() != keeper {
        bail!("the keeper is gone");
    }
    info!(uid = %inherited.who.uid, gid = %inherited.who.gid, "worker running unprivileged");
    crate::net::serve_in_process(|shutdown| async move {
        let control = std::os::unix::net::UnixStream::from(inherited.control);
        control.set_nonblocking(true)?;
        let control = tokio::net::UnixStream::from_std(control)?;
        let (mut from_keeper, to_keeper) = tokio::io::split(control);
        let (kind, payload) = read_frame(&mut from_keeper).await?;
        if kind != FRAME_CONFIG {
            bail!("the keeper sent no configuration");
        }
        let config = Config::from_toml(
            &String::from_utf8_lossy(&payload),
            "configuration from the keeper",
        )?;
        let folders = Folders {
            store: Folder::from_fd(inherited.store, config.output_directory.clone())
                .context("the store folder from the keeper")?,
            store_lock: Some(std::fs::File::from(inherited.lock)),
            logs: Some(
                Folder::from_fd(inherited.logs, config.log_directory.clone())
                    .context("the log folder from the keeper")?,
            ),
        };
        if let Some(logs) = &folders.logs {
            crate::logs::attach_file_log(
                file_log,
                logs,
                crate::logs::LOG_FILE,
                config.log_max_bytes,
            );
        }
        let to_listener = |fd: OwnedFd| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let sockets = Sockets {
            plain: inherited.plain.map(to_listener).transpose()?,
            tls: inherited.tls.map(to_listener).transpose()?,
            led: inherited.led.map(std::fs::File::from),
        };
        let (tls_tx, tls_rx) = mpsc::channel(4);
        let tls = match (&sockets.tls, config.tls.files()) {
            (Some(_), Some(files)) => {
                let (kind, payload) = read_frame(&mut from_keeper).await?;
                if kind != FRAME_TLS {
                    bail!("the keeper sent no TLS material");
                }
                TlsFeed::Keeper {
                    first: decode_material(&payload)?,
                    policy: files.policy(),
                    updates: tls_rx,
                }
            }
            _ => TlsFeed::None,
        };
        let (config_tx, config_updates) = mpsc::channel(4);
        shutdown.spawn(from_keeper_frames(
            from_keeper,
            tls_tx,
            config_tx,
            shutdown.token(),
        ));
        let (events, events_rx) = mpsc::channel::<ServiceEvent>(64);
        shutdown.spawn(events_to_keeper(events_rx, to_keeper));
        Ok(Service {
            config,
            sockets,
            folders,
            tls,
            events,
            config_updates,
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The worker's side of later frames from the keeper: renewed
/// certificates, and configurations to apply while serving. Ends at the
/// stop, or when the keeper is gone.
async fn from_keeper_frames<R: AsyncRead + Unpin>(
    mut from_keeper: R,
    tls: mpsc::Sender<TlsMaterial>,
    configs: mpsc::Sender<Config>,
    stop: CancellationToken,
) {
    loop {
        let (kind, payload) = tokio::select! {
            _ = stop.cancelled() => return,
            frame = read_frame(&mut from_keeper) => match frame {
                Ok(frame) => frame,
                Err(_) => return,
            },
        };
        match kind {
            FRAME_TLS => match decode_material(&payload) {
                Ok(m) => {
                    let _ = tls.send(m).await;
                }
                Err(e) => warn!(error = %e, "bad TLS material from the keeper"),
            },
            FRAME_CONFIG => match Config::from_toml(
                &String::from_utf8_lossy(&payload),
                "configuration from the keeper",
            ) {
                Ok(c) => {
                    let _ = configs.send(c).await;
                }
                Err(e) => warn!(error = %e, "bad configuration from the keeper"),
            },
            _ => warn!(kind, "unexpected frame from the keeper"),
        }
    }
}

/// The worker's event sink: each service event goes to the keeper (which
/// notifies systemd), until the service drops its last sender.
async fn events_to_keeper<W: AsyncWrite + Unpin>(
    mut events: mpsc::Receiver<ServiceEvent>,
    mut to_keeper: W,
) {
    while let Some(event) = events.recv().await {
        if write_frame(&mut to_keeper, FRAME_EVENT, event.encode().as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "control frame too long",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((head[0], payload))
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn encode_material(m: &TlsMaterial) -> Vec<u8> {
    let mut out = Vec::new();
    for file in std::iter::once(&m.key)
        .chain(std::iter::once(&m.cert))
        .chain(&m.cas)
    {
        put(&mut out, file.path.to_string_lossy().as_bytes());
        put(&mut out, &file.pem);
    }
    out
}

fn decode_material(mut bytes: &[u8]) -> anyhow::Result<TlsMaterial> {
    let mut take = || -> anyhow::Result<Vec<u8>> {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .context("truncated TLS material")?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            bail!("truncated TLS material");
        }
        let (value, rest) = rest.split_at(len);
        bytes = rest;
        Ok(value.to_vec())
    };
    let mut files = Vec::new();
    loop {
        let path = match take() {
            Ok(p) => PathBuf::from(String::from_utf8_lossy(&p).into_owned()),
            Err(_) => break,
        };
        files.push(PemFile { path, pem: take()? });
    }
    let mut files = files.into_iter();
    Ok(TlsMaterial {
        key: files.next().context("no key in TLS material")?,
        cert: files.next().context("no certificate in TLS material")?,
        cas: files.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_round_trip() {
        let m = TlsMaterial {
            key: PemFile {
                path: "/k.pem".into(),
                pem: b"KEY".to_vec(),
            },
            cert: PemFile {
                path: "/c.pem".into(),
                pem: b"CERT".to_vec(),
            },
            cas: vec![PemFile {
                path: "/ca.pem".into(),
                pem: b"CA".to_vec(),
            }],
        };
        assert_eq!(decode_material(&encode_material(&m)).expect("decodes"), m);
        assert!(decode_material(&[0, 0, 0, 9, 1]).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_are_bounded() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FRAME_EVENT, b"READY")
            .await
            .expect("writes");
        let (kind, payload) = read_frame(&mut &buf[..]).await.expect("reads");
        assert_eq!((kind, payload.as_slice()), (FRAME_EVENT, &b"READY"[..]));
        let huge = [FRAME_TLS, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).await.is_err());
    }

    #[test]
    fn worker_spec_is_checked() {
        assert!(parse_inherited("control=1,uid=1,gid=1").is_err());
        assert!(parse_inherited("uid=1,gid=1").is_err());
        assert!(parse_inherited("control=x").is_err());
    }
}
