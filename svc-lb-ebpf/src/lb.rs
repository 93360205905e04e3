//! Backend choice shared by the TC and XDP programs: conntrack first, otherwise a random slot of
//! the frontend; creates the conntrack entries of new flows (SNATed ones for external traffic
//! to backends on other nodes) and keeps the global counters.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32},
    maps::lpm_trie::Key,
};
use aya_log_ebpf::debug;
use svc_lb_common::{
    BackendV4, CT_DIR_FORWARD, CT_F_SNAT, IPPROTO_TCP, RevNatId, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SRC_RANGE_FIXED_BITS, STAT_CT_FULL, STAT_CT_HIT, STAT_CT_NEW, STAT_CT_RESELECT,
    STAT_LOOKUP_MISS, STAT_SNAT, STAT_SNAT_FAIL, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER,
    SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, ServiceEntry, ServiceKeyV4,
    SrcRangeKeyV4,
    maglev::{self, MAGLEV_TABLE_SIZE},
    select::slot_for_hash,
};

use crate::{
    affinity, ct,
    maps::{LB4_BACKENDS, LB4_LOCAL_SRC, LB4_MAGLEV, LB4_SERVICES, LB4_SRC_RANGES, stat},
    parse::{Packet, TCP_ACK, TCP_SYN},
};

/// `AF_INET` for `bpf_fib_lookup::family`.
const AF_INET: u8 = 2;

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

/// The `SCOPE_INTERNAL` twin of a traffic-policy-Local external frontend (every ready
/// endpoint), if it has one.
#[inline(always)]
pub fn internal_twin(
    key: &ServiceKeyV4,
    svc: &ServiceEntry,
) -> Option<(ServiceKeyV4, ServiceEntry)> {
    if svc.flags & SVC_F_LOCAL == 0 || svc.flags & EXTERNAL_KINDS == 0 {
        return None;
    }
    let twin = ServiceKeyV4 {
        scope: SCOPE_INTERNAL,
        ..*key
    };
    Some((twin, frontend(&twin)?))
}

/// The frontend entry a packet uses: externalTrafficPolicy Local restricts only traffic from
/// outside the cluster. A source in `LB4_LOCAL_SRC` (pods of the cluster CIDRs, this node) gets
/// the frontend's internal twin, balancing over every ready endpoint like kube-proxy's
/// short-circuit to the Service's cluster chain.
#[inline(always)]
pub fn scoped(p: &Packet, key: ServiceKeyV4, svc: ServiceEntry) -> (ServiceKeyV4, ServiceEntry) {
    if svc.flags & SVC_F_LOCAL == 0 || LB4_LOCAL_SRC.get(Key::new(32, p.saddr)).is_none() {
        return (key, svc);
    }
    internal_twin(&key, &svc).unwrap_or((key, svc))
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
    let idx = unsafe { core::ptr::read_volatile(&raw const idx) };
    // SAFETY: pointer from a successful lookup; one u32 read, bounds checked by `get`.
    let id = unsafe { *(*table).backend_ids.get(idx)? };
    (id != 0).then_some(id)
}

/// A TCP SYN without ACK, or any non-TCP packet (UDP has no connection to keep).
#[inline(always)]
fn opens_connection(p: &Packet) -> bool {
    p.proto != IPPROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The backend a packet goes to, and the source NAT of its flow (backends on another node).
#[derive(Clone, Copy)]
pub struct Pick {
    pub backend_id: u32,
    pub be: BackendV4,
    pub snat: Option<ct::Snat>,
}

/// Frontend kinds that carry traffic from outside the cluster (externalTrafficPolicy applies).
pub const EXTERNAL_KINDS: u16 = SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

/// Backend and SNAT for the packet's flow, or `None` when a slot or backend is missing (the
/// agent is midway through an update; counted as STAT_LOOKUP_MISS) or a needed SNAT failed
/// (STAT_SNAT_FAIL); the caller drops, so the client retransmits.
#[inline(always)]
pub fn pick_backend<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    p: &Packet,
    key: &ServiceKeyV4,
    svc: &ServiceEntry,
) -> Option<Pick> {
    if let Some(found) = established(p) {
        return Some(found);
    }
    choose(ctx, ifindex, p, key, svc)
}

/// The backend of the packet's existing flow, if its conntrack entry names a backend that still
/// exists and may take this packet (a draining backend keeps its connections but gets no new
/// one). Also answers for frontends that have no backends left: their established flows drain.
#[inline(always)]
pub fn established(p: &Packet) -> Option<Pick> {
    if let Some(ct) = ct::lookup_touch(&ct::packet_key(p, CT_DIR_FORWARD), p) {
        match LB4_BACKENDS.get_ptr(ct.backend_id) {
            Some(be) => {
                // SAFETY: pointer from a successful lookup; copied out at once.
                let be = unsafe { *be };
                // A draining backend keeps the connections it has; a new connection that
                // happens to reuse an old tuple (SYN) must not reach it.
                if be.is_active() || !opens_connection(p) {
                    stat(STAT_CT_HIT);
                    let snat = (ct.flags & CT_F_SNAT != 0).then_some(ct::Snat {
                        addr: ct.nat_addr,
                        port: ct.nat_port,
                    });
                    return Some(Pick {
                        backend_id: ct.backend_id,
                        be,
                        snat,
                    });
                }
                stat(STAT_CT_RESELECT);
            }
            None => stat(STAT_CT_RESELECT),
        }
    }
    None
}

/// Whether a new flow of frontend `svc` to `be` must be SNATed to this node: external traffic
/// under externalTrafficPolicy Cluster to a backend on another node (that node would otherwise
/// answer the client directly, bypassing our reverse NAT).
#[inline(always)]
fn needs_snat(svc: &ServiceEntry, be: &BackendV4) -> bool {
    be.is_remote() && svc.flags & EXTERNAL_KINDS != 0 && svc.flags & SVC_F_LOCAL == 0
}

/// The address this node sends from towards `backend_addr` (the preferred source of the route,
/// what MASQUERADE would pick), from a FIB lookup as if forwarding the packet arriving on
/// `ifindex`. `None` without a route.
#[inline(always)]
fn snat_source<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    p: &Packet,
    backend_addr: u32,
) -> Option<u32> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = p.proto;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = p.saddr;
    params.__bindgen_anon_4.ipv4_dst = backend_addr;
    let flags = BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH;
    // SAFETY: params is a valid, initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    // FRAG_NEEDED only says this packet is larger than the egress MTU; the source is set.
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return None;
    }
    // SAFETY: reading the IPv4 member of the union the helper wrote.
    let src = unsafe { params.__bindgen_anon_3.ipv4_src };
    (src != 0 && src != p.saddr).then_some(src)
}

/// A backend for a new flow (affinity, Maglev table or random slot) and its conntrack entries.
#[inline(always)]
fn choose<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    p: &Packet,
    key: &ServiceKeyV4,
    svc: &ServiceEntry,
) -> Option<Pick> {
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

    let snat = if needs_snat(svc, &be) {
        let created = snat_source(ctx, ifindex, p, be.addr).and_then(|addr| {
            ct::create_snat(p, be.addr, be.port, backend_id, svc.rev_nat_id, addr)
        });
        let Some(snat) = created else {
            stat(STAT_SNAT_FAIL);
            return None;
        };
        stat(STAT_CT_NEW);
        stat(STAT_SNAT);
        Some(snat)
    } else {
        if ct::create(p, be.addr, be.port, backend_id, svc.rev_nat_id) {
            stat(STAT_CT_NEW);
        } else {
            stat(STAT_CT_FULL);
        }
        None
    };
    if svc.affinity_timeout_s != 0 {
        affinity::remember(p.saddr, svc.rev_nat_id, backend_id);
    }
    // Only the first SYN of a connection is logged, at debug level: the agent sets the kernel-side
    // level at load, so at its default filter the record is never written.
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        debug!(
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
    Some(Pick {
        backend_id,
        be,
        snat,
    })
}
