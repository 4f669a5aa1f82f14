//! Networking: the TCP listeners (plain and TLS), connection bounds, and
//! the wiring of a configuration into a running receiver.

pub mod server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::dimse::negotiation::AcceptPolicy;
use crate::dimse::scp::{ScpShared, Stats};
use crate::store::{Store, StoreOptions};
use crate::tls::TlsReloader;
use server::{Listener, ServerLimits, SharedBounds};

/// Opens the store, binds the ports and serves until `stop` resolves.
pub async fn run(
    config: &Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (store, swept) = Store::open(StoreOptions {
        root: config.output_directory.clone(),
        layout: config.layout,
        fsync: config.fsync,
        reserve_percent: config.free_space_reserve_percent,
        overwrite: config.overwrite,
    })?;
    if swept > 0 {
        info!(swept, "removed temp files left by an earlier crash");
    }
    let free = store
        .free_space()
        .map(|(bytes, pct)| format!("{:.1} GB ({pct:.1} %)", bytes as f64 / 1e9))
        .unwrap_or_else(|e| e.to_string());
    let store = Arc::new(store);
    let stats = Arc::new(Stats::default());
    let bounds = SharedBounds::new(ServerLimits {
        max_associations: config.max_associations,
        max_pending: config.max_pending_connections,
        acse_timeout: Duration::from_secs(config.acse_timeout),
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
    });
    let listener_for = |aetitle: &str, tls: Option<Arc<TlsReloader>>| Listener {
        shared: ScpShared {
            store: Arc::clone(&store),
            ae_title: aetitle.to_string(),
            dimse_timeout: Duration::from_secs(config.dimse_timeout),
            stats: Arc::clone(&stats),
        },
        policy: AcceptPolicy {
            ae_title: aetitle.to_string(),
            max_pdu: config.max_pdu,
            accept_private_sop_classes: config.accept_private_sop_classes,
        },
        tls,
        bounds: bounds.clone(),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners = tokio::task::JoinSet::new();
    if config.listen_plain {
        let socket = bind(config, config.port).await?;
        info!(
            aetitle = %config.aetitle, addr = %socket.local_addr()?, tls = false,
            store = %config.output_directory.display(), layout = ?config.layout,
            fsync = config.fsync, free = %free, "listening"
        );
        listeners.spawn(server::serve(
            socket,
            listener_for(&config.aetitle, None),
            stop_rx.clone(),
        ));
    }
    if let Some(files) = config.tls.files() {
        let (reloader, cert) = TlsReloader::new(files).context("TLS configuration")?;
        let reloader = Arc::new(reloader);
        let socket = bind(config, config.tls.port).await?;
        let aetitle = config.tls.aetitle.as_deref().unwrap_or(&config.aetitle);
        info!(
            %aetitle, addr = %socket.local_addr()?, tls = true,
            subject = %cert.subject, serial = %cert.serial, not_after = %cert.not_after,
            peer_cert = ?config.tls.peer_cert, cipher_preference = ?config.tls.cipher_preference,
            store = %config.output_directory.display(), free = %free, "listening"
        );
        tokio::spawn(Arc::clone(&reloader).watch(
            Duration::from_secs(config.tls.reload_check),
            stop_rx.clone(),
        ));
        listeners.spawn(server::serve(
            socket,
            listener_for(aetitle, Some(reloader)),
            stop_rx.clone(),
        ));
    }
    tokio::select! {
        _ = stop => {}
        Some(ended) = listeners.join_next() => {
            // A listener only ends on its own by failing.
            ended.context("listener task")??;
        }
    }
    let _ = stop_tx.send(true);
    while let Some(ended) = listeners.join_next().await {
        ended.context("listener task")??;
    }
    info!("stopped");
    Ok(())
}

async fn bind(config: &Config, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((config.bind, port))
        .await
        .with_context(|| format!("binding {}:{port}", config.bind))
}
