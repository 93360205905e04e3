//! The part of a sync both modes share: objects -> desired state -> maps, with the logging that
//! goes with it (each distinct set of problems once, failures once per distinct error) and the
//! telemetry for the optional servers. The modes differ only in where the objects come from and
//! in what a failure means (fatal at manifest-mode startup, retried otherwise).

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Dedup, RunError, Trigger};
use crate::{
    cli::RunArgs,
    error::chain,
    k8s::manifest::Objects,
    maps::BpfLbMaps,
    model::DesiredState,
    reconcile::{self, Limits, Outcome},
    translate::{TranslateConfig, translate},
    views::Telemetry,
};

pub(super) struct MapSync {
    maps: BpfLbMaps,
    translate_cfg: TranslateConfig,
    limits: Limits,
    rejected_log: Dedup,
    plan_log: Dedup,
    last_error: Option<String>,
    /// Services and EndpointSlices of the last translation (logged with each sync).
    counts: (usize, usize),
    /// Sync latency, rejected objects and the last objects, for the optional servers.
    telemetry: Telemetry,
}

impl MapSync {
    pub(super) fn new(
        maps: BpfLbMaps,
        translate_cfg: TranslateConfig,
        args: &RunArgs,
        telemetry: Telemetry,
    ) -> Self {
        Self {
            maps,
            translate_cfg,
            limits: Limits {
                default_algorithm: args.lb_algorithm,
                ..Limits::default()
            },
            rejected_log: Dedup::default(),
            plan_log: Dedup::default(),
            last_error: None,
            counts: (0, 0),
            telemetry,
        }
    }

    /// Translates `objects`, logging the skipped ones (each distinct set once).
    pub(super) fn translate(&mut self, objects: &Objects) -> DesiredState {
        let t = translate(objects, &self.translate_cfg);
        self.telemetry.record_objects(objects, &t.rejected);
        self.counts = (objects.services.len(), objects.endpoint_slices.len());
        let rejected = t
            .rejected
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
        t.state
    }

    /// Programs `desired` into the maps (planned against what is programmed, so a restarted
    /// agent adopts its predecessor's ids), logging frontends that cannot be programmed (each
    /// distinct set once) and what changed.
    pub(super) fn reconcile(
        &mut self,
        desired: &DesiredState,
        why: Trigger,
    ) -> Result<Outcome, RunError> {
        let started = std::time::Instant::now();
        let result = reconcile::reconcile(&mut self.maps, desired, self.limits);
        self.telemetry
            .record_sync(started.elapsed(), result.is_ok());
        let outcome = result.map_err(RunError::Reconcile)?;
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
                services = self.counts.0,
                slices = self.counts.1,
                "synced {} frontends, {} backends ({} ops)",
                outcome.frontends,
                outcome.backends,
                outcome.ops
            );
        } else {
            debug!(trigger = %why, "maps already in sync");
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

/// Waits until `deadline`, forever without one: the debounce/retry arm of both event loops.
pub(super) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
