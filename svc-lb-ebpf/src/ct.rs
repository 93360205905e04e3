//! Conntrack: a forward entry keyed by the client's tuple towards the frontend and a reply entry
//! keyed by the backend's answer, both carrying the same backend and rev-NAT ids.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use svc_lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CtEntry, CtKeyV4, RevNatId};

use crate::{
    maps::LB4_CT,
    parse::{Packet, TCP_FIN, TCP_RST},
};

#[inline(always)]
pub fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// Key of the packet's own tuple in direction `dir`.
#[inline(always)]
pub fn packet_key(p: &Packet, dir: u8) -> CtKeyV4 {
    key(p.saddr, p.daddr, p.sport, p.dport, p.proto, dir)
}

#[inline(always)]
fn closing(p: &Packet) -> bool {
    p.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Looks up an entry and, on a hit, refreshes `last_seen_ns` and records FIN/RST. Returns a copy.
#[inline(always)]
pub fn lookup_touch(k: &CtKeyV4, p: &Packet) -> Option<CtEntry> {
    let e = LB4_CT.get_ptr_mut(k)?;
    // SAFETY: the pointer comes from a successful lookup; racing updates of these plain fields
    // from another CPU are harmless (last writer wins).
    unsafe {
        (*e).last_seen_ns = bpf_ktime_get_ns();
        if closing(p) {
            (*e).flags |= CT_F_CLOSING;
        }
        Some(*e)
    }
}

/// Creates (or replaces, on reselection) both entries of a flow. Returns false when an insert
/// failed; the packet is still forwarded.
#[inline(always)]
pub fn create(
    p: &Packet,
    backend_addr: u32,
    backend_port: u16,
    backend_id: u32,
    rev_nat_id: RevNatId,
) -> bool {
    let entry = CtEntry {
        backend_id,
        rev_nat_id,
        flags: if closing(p) { CT_F_CLOSING } else { 0 },
        _pad: [0; 7],
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    let fwd = packet_key(p, CT_DIR_FORWARD);
    let rev = key(
        backend_addr,
        p.saddr,
        backend_port,
        p.sport,
        p.proto,
        CT_DIR_REPLY,
    );
    let ok_fwd = LB4_CT.insert(fwd, entry, 0).is_ok();
    let ok_rev = LB4_CT.insert(rev, entry, 0).is_ok();
    ok_fwd && ok_rev
}
