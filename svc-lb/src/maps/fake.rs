//! In-memory `LbMaps` for tests: same semantics as the kernel maps, plus fault injection so the
//! reconciler's stop-and-retry behaviour can be tested.

use std::collections::BTreeMap;

use svc_lb_common::RevNatId;
use svc_lb_common::{AffinityEntry, AffinityKeyV4, Counter, CtEntry, CtKeyV4};

use super::MapsError;
use super::{LbMaps, LbStats, MapState, Op};

#[derive(Clone, Debug, Default)]
pub struct FakeLbMaps {
    pub state: MapState,
    /// Counters the "datapath" wrote, keyed like the BPF arrays; absent = zero.
    pub svc_stats: BTreeMap<RevNatId, Counter>,
    pub be_stats: BTreeMap<u32, Counter>,
    pub global: Vec<u64>,
    pub ct: Vec<(CtKeyV4, CtEntry)>,
    pub affinity: Vec<(AffinityKeyV4, AffinityEntry)>,
    pub capacity: crate::dataplane::capacity::MapCapacity,
    /// The monotonic clock `flows` reports.
    pub now_ns: u64,
    /// Every op applied successfully, in order.
    pub log: Vec<Op>,
    /// Fail the op with this index (counting every `apply` call from 0), once.
    pub fail_at: Option<usize>,
    calls: usize,
}

impl FakeLbMaps {
    pub fn new(state: MapState) -> Self {
        Self {
            state,
            ..Self::default()
        }
    }

    /// Makes the `n`-th future `apply` call (0 = the next one) fail once.
    pub fn fail_nth_from_now(&mut self, n: usize) {
        self.fail_at = Some(self.calls + n);
    }
}

impl LbMaps for FakeLbMaps {
    fn dump(&self) -> Result<MapState, MapsError> {
        Ok(self.state.clone())
    }

    fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        let index = self.calls;
        self.calls += 1;
        if self.fail_at == Some(index) {
            self.fail_at = None;
            return Err(MapsError::Injected { index });
        }
        match op {
            Op::ZeroSvcStats(id) => {
                self.svc_stats.remove(id);
            }
            Op::ZeroBackendStats(id) => {
                self.be_stats.remove(id);
            }
            Op::PurgeFlows(purge) => {
                self.ct.retain(|(k, e)| !purge.flow(k, e));
                self.affinity.retain(|(k, e)| !purge.affinity(k, e));
            }
            _ => op.apply_to(&mut self.state),
        }
        self.log.push(op.clone());
        Ok(())
    }

    fn flows(&self) -> Result<(u64, Vec<(CtKeyV4, CtEntry)>), MapsError> {
        Ok((self.now_ns, self.ct.clone()))
    }
}

impl LbStats for FakeLbMaps {
    fn capacity(&self) -> crate::dataplane::capacity::MapCapacity {
        self.capacity
    }

    fn svc_counter(&self, rev_nat_id: RevNatId) -> Result<Counter, MapsError> {
        Ok(self.svc_stats.get(&rev_nat_id).copied().unwrap_or_default())
    }

    fn backend_counter(&self, backend_id: u32) -> Result<Counter, MapsError> {
        Ok(self.be_stats.get(&backend_id).copied().unwrap_or_default())
    }

    fn global_counters(&self) -> Result<Vec<u64>, MapsError> {
        Ok(self.global.clone())
    }

    fn conntrack(&self) -> Result<Vec<(CtKeyV4, CtEntry)>, MapsError> {
        Ok(self.ct.clone())
    }
}
