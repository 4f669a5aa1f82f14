//! Networking: the TCP listener, connection bounds and the wiring of a
//! configuration into a running receiver.

pub mod server;

use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::info;

use crate::config::Config;
use crate::dimse::negotiation::AcceptPolicy;
use crate::dimse::scp::{ScpShared, Stats};
use crate::store::{Store, StoreOptions};

/// Opens the store, binds the port and serves until `stop` resolves.
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
    let addr = (config.bind, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {}:{}", config.bind, config.port))?;
    let free = store
        .free_space()
        .map(|(bytes, pct)| format!("{:.1} GB ({pct:.1} %)", bytes as f64 / 1e9))
        .unwrap_or_else(|e| e.to_string());
    info!(
        aetitle = %config.aetitle,
        addr = %listener.local_addr()?,
        store = %config.output_directory.display(),
        layout = ?config.layout,
        fsync = config.fsync,
        free = %free,
        "listening"
    );
    let shared = ScpShared {
        store,
        ae_title: config.aetitle.clone(),
        dimse_timeout: Duration::from_secs(config.dimse_timeout),
        stats: Stats::default(),
    };
    let policy = AcceptPolicy {
        ae_title: config.aetitle.clone(),
        max_pdu: config.max_pdu,
        accept_private_sop_classes: config.accept_private_sop_classes,
    };
    let limits = server::ServerLimits {
        max_associations: config.max_associations,
        max_pending: config.max_pending_connections,
        acse_timeout: Duration::from_secs(config.acse_timeout),
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
    };
    server::serve(listener, shared, policy, limits, stop).await?;
    info!("stopped");
    Ok(())
}
