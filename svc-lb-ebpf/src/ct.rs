//! Conntrack: a forward entry keyed by the client's tuple towards the frontend and a reply entry
//! keyed by the backend's answer, both carrying the same backend and rev-NAT ids. A flow to a
//! backend on another node is also SNATed to this node: its reply entry is keyed by the tuple
//! backend -> node address:SNAT port and remembers the client to restore.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use svc_lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_SNAT, CtEntry, CtKeyV4, RevNatId,
    SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES,
};

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
        // The coarse clock (CLOCK_MONOTONIC at tick resolution) is a plain read of the last
        // tick's time; bpf_ktime_get_ns reads the clocksource, ~20 ns a packet in a VM
        // (kvm-clock). Conntrack ages are compared in seconds, so a tick's lag does not matter.
        (*e).last_seen_ns = bpf_ktime_get_coarse_ns();
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
    let entry = new_entry(p, backend_id, rev_nat_id);
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

#[inline(always)]
fn new_entry(p: &Packet, backend_id: u32, rev_nat_id: RevNatId) -> CtEntry {
    CtEntry {
        backend_id,
        rev_nat_id,
        flags: if closing(p) { CT_F_CLOSING } else { 0 },
        // SAFETY: helper without arguments.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
        ..Default::default()
    }
}

/// The node address and port (network order) a SNATed flow's client source is rewritten to.
#[derive(Clone, Copy)]
pub struct Snat {
    pub addr: u32,
    pub port: u16,
}

/// Creates the entries of a flow SNATed to `nat_addr`: picks a source port in
/// `SNAT_PORT_MIN..=SNAT_PORT_MAX` whose reply tuple (backend -> node address:port) is free by
/// inserting the reply entry with BPF_NOEXIST (so two CPUs cannot take the same port), then the
/// forward entry. `None` when no port was free after `SNAT_PORT_TRIES` random tries, or the
/// forward entry could not be written (the reply entry is removed again).
#[inline(always)]
pub fn create_snat(
    p: &Packet,
    backend_addr: u32,
    backend_port: u16,
    backend_id: u32,
    rev_nat_id: RevNatId,
    nat_addr: u32,
) -> Option<Snat> {
    let mut reply = new_entry(p, backend_id, rev_nat_id);
    reply.flags |= CT_F_SNAT;
    let mut forward = reply;
    // The reply is rewritten back to the client; the forward direction to the node.
    reply.nat_addr = p.saddr;
    reply.nat_port = p.sport;
    forward.nat_addr = nat_addr;
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let port = (SNAT_PORT_MIN as u32 + start.wrapping_add(i) % range) as u16;
        let port = port.to_be();
        let rev = key(
            backend_addr,
            nat_addr,
            backend_port,
            port,
            p.proto,
            CT_DIR_REPLY,
        );
        if LB4_CT.insert(rev, reply, u64::from(BPF_NOEXIST)).is_ok() {
            forward.nat_port = port;
            if LB4_CT
                .insert(packet_key(p, CT_DIR_FORWARD), forward, 0)
                .is_err()
            {
                let _ = LB4_CT.remove(rev);
                return None;
            }
            return Some(Snat {
                addr: nat_addr,
                port,
            });
        }
        i += 1;
    }
    None
}
