//! Connection draining: a TCP backend that leaves the desired state is kept in `LB4_BACKENDS`
//! (state TERMINATING, in no slot) while live conntrack entries still use it, so established
//! connections run to their end while new connections never reach it. UDP has no end of
//! connection to wait for, and a stale UDP flow is exactly the "DNS keeps asking a deleted pod"
//! bug, so removed UDP backends are deleted at once and their flows purged.
//!
//! Ids stay safe: a draining backend keeps its id (the allocator sees it as used), and it is
//! only deleted together with a purge of every conntrack entry that still names it.
//!
//! A deleted Service drains the same way: its TCP frontends stay as slot 0 without slots
//! (count 0: the datapath serves established flows and refuses new ones), with their rev-NAT
//! entry (replies are still rewritten), while established flows use their rev-NAT id. Without that,
//! deleting a Service would cut its established connections although deleting its pods one by
//! one does not.

use std::collections::BTreeSet;

use svc_lb_common::{
    BE_STATE_TERMINATING, BackendV4, CT_DIR_FORWARD, CT_F_CLOSING, CtEntry, CtKeyV4, IPPROTO_TCP,
    RevNatId, SCOPE_INTERNAL, ServiceEntry,
};

use super::{
    Limits,
    plan::{KIND_FLAGS, Planner, frontend_key},
};
use crate::{
    maps::MapState,
    model::{DesiredState, FrontendKey, Proto},
};

/// What live TCP flows use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Live {
    /// Backend ids of flows seen within `drain_idle` (`drain_closing` once a FIN or RST was
    /// seen, enough for the last segments of the close).
    pub(super) backends: BTreeSet<u32>,
    /// Rev-NAT ids of established flows within `drain_idle`: the client side (forward
    /// entry) has sent no FIN or RST yet. Closing flows do not keep a deleted Service: its
    /// address should stop answering as soon as no client uses it any more, not a minute after
    /// every short request. (The reply entry is not asked: a server whose client reset the
    /// connection never sends a FIN, so that entry would look established for an hour.)
    pub(super) frontends: BTreeSet<RevNatId>,
}

/// The ids live TCP flows use (see [`Live`]).
pub(super) fn live_tcp(flows: &[(CtKeyV4, CtEntry)], now_ns: u64, limits: &Limits) -> Live {
    let idle = limits.drain_idle.as_nanos();
    let closing = limits.drain_closing.as_nanos();
    let mut live = Live::default();
    for (k, e) in flows.iter().filter(|(k, _)| k.proto == IPPROTO_TCP) {
        let age = u128::from(now_ns.saturating_sub(e.last_seen_ns));
        if e.flags & CT_F_CLOSING != 0 {
            if age < closing {
                live.backends.insert(e.backend_id);
            }
        } else if age < idle {
            live.backends.insert(e.backend_id);
            if k.dir == CT_DIR_FORWARD {
                live.frontends.insert(e.rev_nat_id);
            }
        }
    }
    live
}

/// Whether a programmed frontend that is not desired any more might drain instead of going.
pub(super) fn may_drain(key: &FrontendKey) -> bool {
    key.proto == Proto::Tcp
}

/// Whether the plan may have to decide about draining: some programmed TCP backend or TCP
/// frontend is not in the desired state (removed now, or already draining). Otherwise
/// conntrack is not read.
pub(super) fn needs_flow_scan(desired: &DesiredState, current: &MapState) -> bool {
    let removed_frontend = current
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .filter_map(|(k, _)| {
            Some(FrontendKey {
                ip: k.ip(),
                port: k.port(),
                proto: Proto::from_number(k.proto)?,
                internal: k.scope == SCOPE_INTERNAL,
            })
        })
        .any(|k| may_drain(&k) && !desired.frontends.contains_key(&k));
    if removed_frontend {
        return true;
    }
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

/// The planner's drain decisions.
impl Planner<'_> {
    /// A programmed TCP frontend that is no longer desired but still has live flows stays as
    /// slot 0 without slots (the datapath then serves established flows and refuses new ones)
    /// with its rev-NAT entry and name; its backends drain in `drain_backends`. Maglev tables,
    /// source ranges and affinity go: they only matter for new connections.
    pub(super) fn drain_frontend(&mut self, key: &FrontendKey) {
        let Some(p) = self.programmed.get(key) else {
            return;
        };
        let rev = p.rev_nat_id;
        let cur = self.current;
        let k0 = frontend_key(key, 0);
        let (Some(entry0), Some(r)) = (cur.services.get(&k0), cur.revnat.get(&rev)) else {
            return;
        };
        if !may_drain(key)
            || !self.live.frontends.contains(&rev)
            // A desired frontend adopted the id (only in maps with duplicated ids).
            || self.target.revnat.contains_key(&rev)
        {
            return;
        }
        tracing::info!(
            frontend = %key,
            rev_nat_id = rev,
            "removed frontend kept without backends while established flows use it"
        );
        self.target.services.insert(
            k0,
            ServiceEntry {
                count: 0,
                rev_nat_id: rev,
                flags: entry0.flags & KIND_FLAGS,
                ..Default::default()
            },
        );
        self.target.revnat.insert(rev, *r);
        if let Some(n) = cur.names.get(&rev) {
            self.target.names.insert(rev, *n);
        }
    }

    /// Removed TCP backends that live flows still use stay, TERMINATING (in no slot, so no new
    /// flow can pick them); the rest are deleted by the diff. Only `candidates` are looked at.
    pub(super) fn drain_backends(&mut self, candidates: impl IntoIterator<Item = u32>) {
        for id in candidates {
            let Some(b) = self.current.backends.get(&id) else {
                continue;
            };
            if b.proto == IPPROTO_TCP
                && self.live.backends.contains(&id)
                && (1..self.limits.max_backends).contains(&id)
                && !self.target.backends.contains_key(&id)
            {
                let draining = BackendV4 {
                    state: BE_STATE_TERMINATING,
                    ..*b
                };
                self.target.backends.insert(id, draining);
            }
        }
    }
}

/// Removed TCP backends kept for their flows.
pub(super) fn draining(state: &MapState) -> usize {
    state
        .backends
        .values()
        .filter(|b| b.state == BE_STATE_TERMINATING)
        .count()
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
                rev_nat_id: backend_id * 10,
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
            // The server side of a flow its client reset: no FIN ever, keeps no frontend.
            (
                CtKeyV4 {
                    proto: IPPROTO_TCP,
                    dir: svc_lb_common::CT_DIR_REPLY,
                    ..Default::default()
                },
                CtEntry {
                    backend_id: 7,
                    rev_nat_id: 70,
                    last_seen_ns: 990 * S,
                    ..Default::default()
                },
            ),
        ];
        let live = live_tcp(&flows, 1000 * S, &limits);
        assert_eq!(live.backends, BTreeSet::from([1, 3, 6, 7]));
        assert_eq!(
            live.frontends,
            BTreeSet::from([10, 60]),
            "closing flows keep no frontend"
        );
    }
}
