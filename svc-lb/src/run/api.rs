//! API mode (`svc-lb run` without `--manifests`): watch the API server and keep the maps equal
//! to what it holds, through the same translation and reconcile as manifest mode.
//!
//! Order of events:
//! 1. everything that can fail on bad arguments (node IPs, kubeconfig, health address) before
//!    the datapath is touched;
//! 2. the datapath is loaded (reusing the pinned maps: programmed frontends keep working);
//! 3. the watchers list Services, EndpointSlices and this Node, retrying with backoff while the
//!    API server is unreachable; the maps are not written until all three lists completed, so
//!    a restarted agent never programs a partial view (and `/healthz` says 503 meanwhile);
//! 4. the first reconcile adopts what is programmed (ids, so established flows survive);
//! 5. every change (coalesced over [`DEBOUNCE`]) rebuilds the desired state from the stores and
//!    reconciles: only the frontends whose backends changed get writes. A full reconcile also
//!    runs every `--resync-interval`, repairing whatever drifted in the maps.

use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};
use tracing::{info, warn};

use super::{
    RunError, Trigger, load_datapath, log_exit, node_ips,
    sync::{self, MapSync, Scope},
};
use crate::{
    cli::RunArgs,
    k8s::{client::client, watch::ClusterWatch},
    serve::health::{self, HealthState},
    translate::TranslateConfig,
};

/// Window that coalesces a burst of watch events (a rollout touches many slices at once).
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// Retry delay after a failed reconcile (the periodic resync may be far away).
const RETRY: Duration = Duration::from_secs(1);
/// How often "still waiting for the API server" is logged before the first sync.
const WAIT_LOG: Duration = Duration::from_secs(10);

/// This node's name: `--node-name`/`$NODE_NAME`, else the host name (like kube-proxy's
/// default for `--hostname-override`).
fn node_name(args: &RunArgs) -> String {
    if let Some(n) = args.node_name.as_deref().filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default()
}

struct Syncer {
    sync: MapSync,
    health: Arc<HealthState>,
}

impl Syncer {
    /// Translate what changed in the stores and reconcile (only the changed frontends, or
    /// everything with `Scope::Full`); false if the maps could not be programmed.
    fn sync(&mut self, watch: &ClusterWatch, scope: Scope, why: Trigger) -> bool {
        self.sync.update(&watch.shared());
        let result = self.sync.reconcile(scope, why);
        self.sync.log_result(&result);
        self.health.reconciled(result.is_ok());
        result.is_ok()
    }
}

/// Runs API mode until SIGINT/SIGTERM.
pub(super) async fn run(args: &RunArgs) -> Result<(), RunError> {
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;

    let node_ips = node_ips(args)?;
    let node_name = node_name(args);
    if node_name.is_empty() {
        warn!("no node name (--node-name, $NODE_NAME or the host name): no Node addresses");
    }
    let (client, info) = client(
        args.kube.kubeconfig.as_deref(),
        args.kube.context.as_deref(),
    )
    .await?;
    info!(
        server = %info.server,
        config = %info.source,
        node = %node_name,
        ?node_ips,
        "API mode"
    );
    let health = Arc::new(HealthState::default());
    let health_addr = args.kube.health_addr;
    health::serve(health_addr, health.clone())
        .await
        .map_err(|source| RunError::Health {
            addr: health_addr,
            source,
        })?;
    info!(addr = %health_addr, "health endpoint: /healthz (503 until synced), /livez");
    let telemetry = crate::serve::Telemetry::new();
    crate::serve::servers::start(&args.views, &args.pin.pin_dir, &telemetry).await?;

    let (dataplane, maps) = load_datapath(args)?;
    let watch = ClusterWatch::start(client, &node_name);
    info!(
        "waiting for the initial lists of Services, EndpointSlices and Node {node_name:?}; \
         the maps keep what is programmed until then"
    );

    let mut waiting = tokio::time::interval_at(Instant::now() + WAIT_LOG, WAIT_LOG);
    let stopped = {
        let synced = watch.wait_synced();
        let mut synced = std::pin::pin!(synced);
        loop {
            tokio::select! {
                _ = sigint.recv() => { info!("SIGINT"); break true; }
                _ = sigterm.recv() => { info!("SIGTERM"); break true; }
                _ = &mut synced => break false,
                _ = waiting.tick() => info!(server = %info.server, "still waiting for the initial lists"),
            }
        }
    };

    if !stopped {
        if !node_name.is_empty() && watch.objects().nodes.is_empty() {
            warn!(
                node = %node_name,
                "no Node object with this name: NodePorts only use --node-ip (or interface) addresses"
            );
        }
        let translate_cfg = TranslateConfig {
            node_ips,
            node_name: Some(node_name).filter(|n| !n.is_empty()),
            nodeport_range: args.nodeport_range,
        };
        let mut syncer = Syncer {
            sync: MapSync::new(maps, translate_cfg, args, telemetry),
            health,
        };
        let mut deadline =
            (!syncer.sync(&watch, Scope::Full, Trigger::Startup)).then(|| Instant::now() + RETRY);
        let every = args.kube.resync_interval;
        let mut resync = tokio::time::interval_at(Instant::now() + every, every);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sigint.recv() => { info!("SIGINT"); break; }
                _ = sigterm.recv() => { info!("SIGTERM"); break; }
                _ = watch.changed() => {
                    // The first event of a burst opens the window; later ones ride along.
                    deadline.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                }
                _ = sync::until(deadline) => {
                    deadline = (!syncer.sync(&watch, Scope::Changes, Trigger::Change)).then(|| Instant::now() + RETRY);
                }
                _ = dataplane.link_events() => super::verify_datapath(&dataplane, args)?,
                _ = resync.tick() => {
                    super::verify_datapath(&dataplane, args)?;
                    if !syncer.sync(&watch, Scope::Full, Trigger::Rescan) {
                        deadline.get_or_insert_with(|| Instant::now() + RETRY);
                    }
                }
            }
        }
    }
    drop(watch);
    drop(dataplane);
    log_exit(args);
    Ok(())
}
