//! Backend choice shared by the TC and XDP programs: conntrack first, otherwise a random slot of
//! the frontend; creates the conntrack entries of new flows and keeps the global counters.

use aya_ebpf::{EbpfContext, helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use aya_log_ebpf::info;
use svc_lb_common::{
    BE_STATE_ACTIVE, BackendV4, CT_DIR_FORWARD, IPPROTO_TCP, RevNatId, SCOPE_EXTERNAL,
    SRC_RANGE_FIXED_BITS, STAT_CT_FULL, STAT_CT_HIT, STAT_CT_NEW, STAT_CT_RESELECT,
    STAT_LOOKUP_MISS, SVC_F_MAGLEV, SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4, SrcRangeKeyV4,
    maglev::{self, MAGLEV_TABLE_SIZE},
    select::slot_for_hash,
};

use crate::{
    affinity, ct,
    maps::{LB4_BACKENDS, LB4_MAGLEV, LB4_SERVICES, LB4_SRC_RANGES, stat},
    parse::{Packet, TCP_ACK, TCP_SYN},
};

/// The frontend key (slot 0) a packet addresses.
#[inline(always)]
pub fn frontend_key(p: &Packet) -> ServiceKeyV4 {
    ServiceKeyV4 {
        addr: p.daddr,
        dport: p.dport,
        backend_slot: 0,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    }
}

/// The frontend entry for `key`, copied out of the map.
#[inline(always)]
pub fn frontend(key: &ServiceKeyV4) -> Option<ServiceEntry> {
    let e = LB4_SERVICES.get_ptr(key)?;
    // SAFETY: pointer from a successful lookup; copied out at once.
    Some(unsafe { *e })
}

/// loadBalancerSourceRanges: whether the packet's source may use this frontend.
#[inline(always)]
pub fn source_allowed(p: &Packet, svc: &ServiceEntry) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_FIXED_BITS + 32,
        SrcRangeKeyV4 {
            rev_nat_id: svc.rev_nat_id,
            addr: p.saddr,
        },
    );
    LB4_SRC_RANGES.get(key).is_some()
}

/// The backend the frontend's Maglev table gives the flow; `None` (random slot instead) when
/// the table is missing, e.g. while the agent switches the frontend's algorithm.
#[inline(always)]
fn maglev_pick(p: &Packet, rev_nat_id: RevNatId) -> Option<u32> {
    let table = LB4_MAGLEV.get_ptr(rev_nat_id)?;
    let h = maglev::flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let idx = (h % MAGLEV_TABLE_SIZE as u32) as usize;
    // LLVM lowers the modulo to multiply/shift and then drops `get`'s bounds check as implied,
    // but the verifier cannot follow that arithmetic. A volatile reload hides the range so the
    // explicit comparison stays.
    // SAFETY: reading a local.
    let idx = unsafe { core::ptr::read_volatile(&idx) };
    // SAFETY: pointer from a successful lookup; one u32 read, bounds checked by `get`.
    let id = unsafe { *(*table).backend_ids.get(idx)? };
    (id != 0).then_some(id)
}

/// A TCP SYN without ACK, or any non-TCP packet (UDP has no connection to keep).
#[inline(always)]
fn opens_connection(p: &Packet) -> bool {
    p.proto != IPPROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Backend id and address for the packet's flow, or `None` when a slot or backend is missing
/// (the agent is midway through an update; counted as STAT_LOOKUP_MISS, caller drops so the
/// client retransmits into the finished state).
#[inline(always)]
pub fn pick_backend<C: EbpfContext>(
    ctx: &C,
    p: &Packet,
    key: &ServiceKeyV4,
    svc: &ServiceEntry,
) -> Option<(u32, BackendV4)> {
    if let Some(found) = established(p) {
        return Some(found);
    }
    choose(ctx, p, key, svc)
}

/// The backend of the packet's existing flow, if its conntrack entry names a backend that still
/// exists and may take this packet (a draining backend keeps its connections but gets no new
/// one). Also answers for frontends that have no backends left: their established flows drain.
#[inline(always)]
pub fn established(p: &Packet) -> Option<(u32, BackendV4)> {
    if let Some(ct) = ct::lookup_touch(&ct::packet_key(p, CT_DIR_FORWARD), p) {
        match LB4_BACKENDS.get_ptr(ct.backend_id) {
            Some(be) => {
                // SAFETY: pointer from a successful lookup; copied out at once.
                let be = unsafe { *be };
                // A draining backend keeps the connections it has; a new connection that
                // happens to reuse an old tuple (SYN) must not reach it.
                if be.state == BE_STATE_ACTIVE || !opens_connection(p) {
                    stat(STAT_CT_HIT);
                    return Some((ct.backend_id, be));
                }
                stat(STAT_CT_RESELECT);
            }
            None => stat(STAT_CT_RESELECT),
        }
    }
    None
}

/// A backend for a new flow (affinity, Maglev table or random slot) and its conntrack entries.
#[inline(always)]
fn choose<C: EbpfContext>(
    ctx: &C,
    p: &Packet,
    key: &ServiceKeyV4,
    svc: &ServiceEntry,
) -> Option<(u32, BackendV4)> {
    let remembered = if svc.affinity_timeout_s != 0 {
        affinity::lookup(p.saddr, svc)
    } else {
        None
    };
    let (backend_id, be) = match remembered {
        Some(found) => found,
        None => {
            let hashed = if svc.flags & SVC_F_MAGLEV != 0 {
                maglev_pick(p, svc.rev_nat_id)
            } else {
                None
            };
            let backend_id = match hashed {
                Some(id) => id,
                None => {
                    // SAFETY: helper without arguments.
                    let slot = slot_for_hash(unsafe { bpf_get_prandom_u32() }, svc.count);
                    let Some(entry) = LB4_SERVICES.get_ptr(key.with_slot(slot)) else {
                        stat(STAT_LOOKUP_MISS);
                        return None;
                    };
                    // SAFETY: pointer from a successful lookup.
                    unsafe { (*entry).backend_id }
                }
            };
            let Some(be) = LB4_BACKENDS.get_ptr(backend_id) else {
                stat(STAT_LOOKUP_MISS);
                return None;
            };
            // SAFETY: as above.
            (backend_id, unsafe { *be })
        }
    };
    if svc.affinity_timeout_s != 0 {
        affinity::remember(p.saddr, svc.rev_nat_id, backend_id);
    }

    if ct::create(p, be.addr, be.port, backend_id, svc.rev_nat_id) {
        stat(STAT_CT_NEW);
    } else {
        stat(STAT_CT_FULL);
    }
    // Only the first SYN of a connection is logged: rare enough to never cost per packet.
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} => backend {} {:i}:{}",
            u32::from_be(p.saddr),
            u16::from_be(p.sport),
            u32::from_be(p.daddr),
            u16::from_be(p.dport),
            backend_id,
            u32::from_be(be.addr),
            u16::from_be(be.port)
        );
    }
    Some((backend_id, be))
}
