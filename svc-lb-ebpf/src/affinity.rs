//! sessionAffinity ClientIP: a new connection from a client reuses the backend the client's
//! previous new connection to the same frontend got, if that was less than the frontend's
//! timeout ago (kube-proxy's `recent` match: only new connections refresh it).
//!
//! The agent purges entries whose backend left the frontend and those of frontends whose
//! affinity was turned off or changed; the state check below is a second line of defence.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use svc_lb_common::{AffinityEntry, AffinityKeyV4, BackendV4, RevNatId, ServiceEntry};

use crate::maps::{LB4_AFFINITY, LB4_BACKENDS};

#[inline(always)]
fn key(client_addr: u32, rev_nat_id: RevNatId) -> AffinityKeyV4 {
    AffinityKeyV4 {
        client_addr,
        rev_nat_id,
    }
}

/// The remembered, still valid and active backend of `client_addr` for this frontend.
#[inline(always)]
pub fn lookup(client_addr: u32, svc: &ServiceEntry) -> Option<(u32, BackendV4)> {
    let e = LB4_AFFINITY.get_ptr(key(client_addr, svc.rev_nat_id))?;
    // SAFETY: pointer from a successful lookup; copied out at once.
    let e = unsafe { *e };
    // SAFETY: helper without arguments.
    let age = unsafe { bpf_ktime_get_ns() }.saturating_sub(e.last_used_ns);
    if age > u64::from(svc.affinity_timeout_s) * 1_000_000_000 {
        return None;
    }
    let be = LB4_BACKENDS.get_ptr(e.backend_id)?;
    // SAFETY: as above.
    let be = unsafe { *be };
    be.is_active().then_some((e.backend_id, be))
}

/// Records (or refreshes) the client's backend for this frontend.
#[inline(always)]
pub fn remember(client_addr: u32, rev_nat_id: RevNatId, backend_id: u32) {
    let entry = AffinityEntry {
        backend_id,
        _pad: 0,
        // SAFETY: helper without arguments.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Best effort: a failed insert only costs the affinity of this one connection.
    let _ = LB4_AFFINITY.insert(key(client_addr, rev_nat_id), entry, 0);
}
