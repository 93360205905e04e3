//! Desired state -> map contents -> ordered writes, through [`Reconciler`] (the only entry
//! point: a full reconcile that adopts what is programmed, or a change planned against the
//! agent's record of the maps).
//!
//! Ids are reused from what is programmed (so a restarted agent keeps them and established
//! conntrack entries, which store ids, stay valid); new ids take the lowest free value. Writes
//! are ordered so the datapath never follows a slot 0 to a slot, backend or rev-NAT entry that
//! does not exist yet or any more.
//!
//! Inside: `plan` works out the target map contents (ids from `ids`, slot order from `slots`,
//! drain decisions from `drain`), `diff` the ordered writes from the current contents to the
//! target, `reconciler` runs them against `LbMaps` and keeps the record.

mod diff;
mod drain;
mod ids;
mod plan;
mod reconciler;
mod slots;
#[cfg(test)]
mod tests;

use std::{fmt, path::Path, time::Duration};

use aya::maps::MapInfo;
use svc_lb_common::{MAX_BACKENDS, MAX_REVNAT, MAX_SERVICE_ENTRIES, SERVICES_MAP};
use thiserror::Error;
use tracing::warn;

pub use self::reconciler::Reconciler;
use crate::{
    dataplane::capacity::MapCapacity,
    maps::{MapsError, Op},
    model::{FrontendKey, LbAlgorithm},
};

/// Map capacities the plan must respect. `Default` = the sizes the datapath declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rev-NAT ids are `1..max_revnat`.
    pub max_revnat: u32,
    /// Backend ids are `1..max_backends`.
    pub max_backends: u32,
    /// Entries in `LB4_SERVICES` (slot 0 + backend slots of every frontend).
    pub max_service_entries: u32,
    /// A removed TCP backend stays (draining) while a flow to it was active this recently.
    pub drain_idle: Duration,
    /// The same for flows that saw a FIN or RST.
    pub drain_closing: Duration,
    /// Backend selection of Services without the `svc-lb.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
}

/// An idle keep-alive connection to a removed pod survives this long; after that its backend
/// id is released (bounded, so flows the LRU never evicts cannot pin ids forever).
const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(3600);
/// Long enough for the FIN/ACK exchange and retransmissions of a close.
const DEFAULT_DRAIN_CLOSING: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_revnat: MAX_REVNAT,
            max_backends: MAX_BACKENDS,
            max_service_entries: MAX_SERVICE_ENTRIES,
            drain_idle: DEFAULT_DRAIN_IDLE,
            drain_closing: DEFAULT_DRAIN_CLOSING,
            default_algorithm: LbAlgorithm::Random,
        }
    }
}

/// The default limits for maps of this capacity.
impl From<&MapCapacity> for Limits {
    fn from(capacity: &MapCapacity) -> Self {
        Limits::default().with_capacity(capacity)
    }
}

impl Limits {
    /// These limits (drain times, default algorithm) for maps of `capacity`.
    pub fn with_capacity(self, capacity: &MapCapacity) -> Self {
        Self {
            max_revnat: capacity.max_services,
            max_backends: capacity.max_backends,
            max_service_entries: capacity.service_entries(),
            ..self
        }
    }

    /// These limits following the maps pinned under `pin_dir` (the sizes the datapath really
    /// has: an adopted map keeps the size it was created with). Unchanged, with a warning, when
    /// the pins cannot be read, so writes beyond the real capacity then fail on the map instead.
    pub fn pinned(self, pin_dir: &Path) -> Self {
        let capacity = match MapCapacity::from_pins(pin_dir) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "cannot read map capacities; using defaults");
                return self;
            }
        };
        let mut limits = self.with_capacity(&capacity);
        if let Ok(info) = MapInfo::from_pin(pin_dir.join(SERVICES_MAP)) {
            limits.max_service_entries = info.max_entries();
        }
        limits
    }
}

/// Why a frontend could not be programmed as desired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanErrorKind {
    RevNatIdsExhausted,
    BackendIdsExhausted,
    ServiceMapFull,
    /// More backends than a slot number can address.
    TooManyBackends(usize),
}

/// A frontend the plan left out (or left as it was). Other frontends are unaffected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct PlanError {
    pub frontend: FrontendKey,
    pub service: String,
    pub kind: PlanErrorKind,
    /// The frontend was already programmed and keeps its previous backends.
    pub kept_previous: bool,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} frontend {}: ", self.service, self.frontend)?;
        match &self.kind {
            PlanErrorKind::RevNatIdsExhausted => f.write_str("no free rev-NAT id")?,
            PlanErrorKind::BackendIdsExhausted => f.write_str("no free backend id")?,
            PlanErrorKind::ServiceMapFull => f.write_str("service map is full")?,
            PlanErrorKind::TooManyBackends(n) => {
                write!(f, "{n} backends, at most {} fit", u16::MAX)?
            }
        }
        f.write_str(if self.kept_previous {
            "; keeping what is programmed"
        } else {
            "; not programmed"
        })
    }
}

/// What one reconcile did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub errors: Vec<PlanError>,
    /// Removed TCP backends kept for their established connections.
    pub draining: usize,
}

/// A write failed; the ones before it were applied. Re-planning from a fresh dump and applying
/// again converges (every write is idempotent).
#[derive(Debug, Error)]
#[error("map write {index} of {total} ({op:?}) failed")]
pub struct ApplyError {
    pub index: usize,
    pub total: usize,
    /// Boxed: keeps the error small.
    pub op: Box<Op>,
    #[source]
    pub source: MapsError,
}

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("cannot read the programmed maps")]
    Dump(#[source] MapsError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}
