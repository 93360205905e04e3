//! Connection draining: a TCP backend that leaves the desired state is kept in `LB4_BACKENDS`
//! (state TERMINATING, in no slot) while live conntrack entries still use it, so established
//! connections run to their end while new connections never reach it. UDP has no end of
//! connection to wait for, and a stale UDP flow is exactly the "DNS keeps asking a deleted pod"
//! bug, so removed UDP backends are deleted at once and their flows purged.
//!
//! Ids stay safe: a draining backend keeps its id (the allocator sees it as used), and it is
//! only deleted together with a purge of every conntrack entry that still names it.

use std::collections::BTreeSet;

use svc_lb_common::{CT_F_CLOSING, CtEntry, CtKeyV4, IPPROTO_TCP};

use super::Limits;
use crate::{maps::MapState, model::DesiredState};

/// Backend ids that live TCP flows use: seen within `drain_idle` (`drain_closing` once a FIN or
/// RST was seen, enough for the last segments of the close).
pub fn live_tcp_backends(
    flows: &[(CtKeyV4, CtEntry)],
    now_ns: u64,
    limits: &Limits,
) -> BTreeSet<u32> {
    let idle = limits.drain_idle.as_nanos();
    let closing = limits.drain_closing.as_nanos();
    flows
        .iter()
        .filter(|(k, _)| k.proto == IPPROTO_TCP)
        .filter(|(_, e)| {
            let age = u128::from(now_ns.saturating_sub(e.last_seen_ns));
            if e.flags & CT_F_CLOSING != 0 {
                age < closing
            } else {
                age < idle
            }
        })
        .map(|(_, e)| e.backend_id)
        .collect()
}

/// Whether the plan may have to decide about draining: some programmed TCP backend is not in
/// the desired state (removed now, or already draining). Otherwise conntrack is not read.
pub fn needs_flow_scan(desired: &DesiredState, current: &MapState) -> bool {
    let wanted: BTreeSet<_> = desired
        .frontends
        .values()
        .flat_map(|f| {
            f.backends
                .iter()
                .map(move |b| (b.ip, b.port, f.key.proto.number()))
        })
        .collect();
    current
        .backends
        .values()
        .any(|b| b.proto == IPPROTO_TCP && !wanted.contains(&(b.ip(), b.port_host(), b.proto)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use svc_lb_common::IPPROTO_UDP;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(proto: u8, backend_id: u32, last_seen_s: u64, closing: bool) -> (CtKeyV4, CtEntry) {
        (
            CtKeyV4 {
                proto,
                sport: backend_id as u16,
                ..Default::default()
            },
            CtEntry {
                backend_id,
                flags: if closing { CT_F_CLOSING } else { 0 },
                last_seen_ns: last_seen_s * S,
                ..Default::default()
            },
        )
    }

    #[test]
    fn only_recent_tcp_flows_keep_a_backend() {
        let limits = Limits {
            drain_idle: Duration::from_secs(100),
            drain_closing: Duration::from_secs(10),
            ..Limits::default()
        };
        let flows = [
            flow(IPPROTO_TCP, 1, 950, false),  // idle 50 s: live
            flow(IPPROTO_TCP, 2, 850, false),  // idle 150 s: gone quiet
            flow(IPPROTO_TCP, 3, 995, true),   // closing, 5 s ago: last segments
            flow(IPPROTO_TCP, 4, 980, true),   // closing, 20 s ago: done
            flow(IPPROTO_UDP, 5, 999, false),  // UDP never drains
            flow(IPPROTO_TCP, 6, 2000, false), // stamped after `now` (clock read earlier)
        ];
        let live = live_tcp_backends(&flows, 1000 * S, &limits);
        assert_eq!(live, BTreeSet::from([1, 3, 6]));
    }
}
