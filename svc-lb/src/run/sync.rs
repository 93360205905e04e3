//! The part of a sync both modes share: objects -> desired state -> maps, with the logging that
//! goes with it (each distinct set of problems once, failures once per distinct error) and the
//! telemetry for the optional servers. The modes differ only in where the objects come from and
//! in what a failure means (fatal at manifest-mode startup, retried otherwise).
//!
//! Syncs are incremental: the translator re-translates only the Services whose objects changed
//! and reports the frontends whose desired value changed; the reconciler writes only those,
//! planned against its record of the maps. A full reconcile (dump the maps, plan everything,
//! repair drift) runs at startup, on the periodic resync, and whenever the record is gone (a
//! write failed).

use std::collections::BTreeSet;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Dedup, RunError, Trigger};
use crate::{
    cli::RunArgs,
    error::chain,
    k8s::manifest::Objects,
    maps::BpfLbMaps,
    model::FrontendKey,
    reconcile::{Limits, Outcome, Reconciler},
    serve::{Telemetry, healthcheck::HealthChecks},
    translate::{IncrementalTranslator, SharedObjects, TranslateConfig},
};

/// How much a reconcile covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// Dump the maps and plan every frontend: adopts what is programmed, repairs drift.
    Full,
    /// Only the frontends that changed since the last successful reconcile.
    Changes,
}

pub(super) struct MapSync {
    maps: BpfLbMaps,
    translator: IncrementalTranslator,
    reconciler: Reconciler,
    /// Frontends whose desired value changed and that are not programmed yet.
    pending: BTreeSet<FrontendKey>,
    rejected_log: Dedup,
    plan_log: Dedup,
    last_error: Option<String>,
    /// Services and EndpointSlices of the last update (logged with each sync).
    counts: (usize, usize),
    /// Sync latency, rejected objects and the last objects, for the optional servers.
    telemetry: Telemetry,
    /// Only the DNS responder reads the objects: without it they are not copied for it.
    share_objects: bool,
    /// healthCheckNodePort servers of LoadBalancer Services with externalTrafficPolicy Local.
    health: HealthChecks,
}

impl MapSync {
    pub(super) fn new(
        maps: BpfLbMaps,
        translate_cfg: TranslateConfig,
        args: &RunArgs,
        telemetry: Telemetry,
    ) -> Self {
        // The limits follow the pinned maps' real sizes (an adopted map keeps its size).
        let limits = Limits {
            default_algorithm: args.lb_algorithm,
            ..Limits::default()
        }
        .pinned(maps.pin_dir());
        Self {
            maps,
            translator: IncrementalTranslator::new(translate_cfg),
            reconciler: Reconciler::new(limits),
            pending: BTreeSet::new(),
            rejected_log: Dedup::default(),
            plan_log: Dedup::default(),
            last_error: None,
            counts: (0, 0),
            telemetry,
            share_objects: args.views.dns_listen.is_some(),
            health: HealthChecks::new(),
        }
    }

    /// Takes the current objects: re-translates what changed, logging the skipped objects
    /// (each distinct set once).
    pub(super) fn update(&mut self, objects: &SharedObjects) {
        let started = std::time::Instant::now();
        let changed = self.translator.update(objects);
        let took = started.elapsed();
        self.health.sync(&self.translator.health_checks());
        let rejected = self.translator.rejected();
        let copy = if self.share_objects {
            objects.to_objects()
        } else {
            Objects::default()
        };
        self.telemetry.record_objects(&copy, rejected);
        self.counts = (objects.services.len(), objects.endpoint_slices.len());
        debug!(
            frontends = changed.len(),
            took_ms = took.as_secs_f64() * 1e3,
            "desired state updated"
        );
        self.pending.extend(changed);
        let rejected = rejected
            .iter()
            .map(|r| format!("skipping {}: {}", r.object, r.reason))
            .collect();
        if let Some(msgs) = self.rejected_log.changed(rejected) {
            if msgs.is_empty() {
                info!("no objects skipped any more");
            }
            for m in msgs {
                warn!("{m}");
            }
        }
    }

    /// Programs the desired state into the maps (a full reconcile adopts what is programmed,
    /// so a restarted agent keeps its predecessor's ids), logging frontends that cannot be
    /// programmed (each distinct set once) and what changed.
    pub(super) fn reconcile(&mut self, scope: Scope, why: Trigger) -> Result<Outcome, RunError> {
        let started = std::time::Instant::now();
        let desired = self.translator.state();
        let result = match scope {
            Scope::Full => self.reconciler.full(&mut self.maps, desired),
            Scope::Changes => self
                .reconciler
                .changed(&mut self.maps, desired, &self.pending),
        };
        let took = started.elapsed();
        self.telemetry.record_sync(took, result.is_ok());
        self.health.set_proxy_healthy(result.is_ok());
        let outcome = result.map_err(RunError::Reconcile)?;
        // A failed reconcile keeps them: the next one (then a full one) programs them.
        self.pending.clear();
        let plan_errors = outcome.errors.iter().map(ToString::to_string).collect();
        if let Some(msgs) = self.plan_log.changed(plan_errors) {
            if msgs.is_empty() {
                info!("every frontend is programmed again");
            }
            for m in msgs {
                warn!("cannot program {m}");
            }
        }
        if outcome.ops > 0 || why == Trigger::Startup {
            info!(
                trigger = %why,
                full = scope == Scope::Full,
                services = self.counts.0,
                slices = self.counts.1,
                took_ms = took.as_secs_f64() * 1e3,
                "synced {} frontends, {} backends ({} ops)",
                outcome.frontends,
                outcome.backends,
                outcome.ops
            );
        } else {
            debug!(trigger = %why, full = scope == Scope::Full, "maps already in sync");
        }
        Ok(outcome)
    }

    /// Logs the result of a sync that will be retried: a failure once per distinct error,
    /// and the recovery after one.
    pub(super) fn log_result<T>(&mut self, result: &Result<T, RunError>) {
        match result {
            Ok(_) => {
                if self.last_error.take().is_some() {
                    info!("reconcile recovered");
                }
            }
            Err(e) => {
                let msg = chain(e);
                if self.last_error.as_deref() != Some(msg.as_str()) {
                    warn!("reconcile failed, will retry: {msg}");
                }
                self.last_error = Some(msg);
            }
        }
    }
}

/// Hands freed heap pages back to the kernel. Startup parses every object through a generic
/// value tree and plans every map entry at once; what that leaves freed is scattered over the
/// heap, where the allocator keeps it (counted in the agent's RSS) unless asked to release it.
pub(super) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Waits until `deadline`, forever without one: the debounce/retry arm of both event loops.
pub(super) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
