//! TC ingress load balancing: reverse NAT of backend replies, DNAT of client packets to a
//! frontend, rejects for frontends without backends.
//!
//! Invariant: every map lookup a decision needs happens before the first write to the packet,
//! so a packet is either rewritten completely or not at all.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use aya_log_ebpf::info;
use svc_lb_common::{
    BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, IPPROTO_TCP, SCOPE_EXTERNAL, STAT_CT_FULL,
    STAT_CT_HIT, STAT_CT_NEW, STAT_CT_RESELECT, STAT_DNAT, STAT_LOOKUP_MISS, STAT_NO_BACKEND,
    STAT_NO_BACKEND_DROP, STAT_PACKETS, STAT_PASS_UNPARSED, STAT_REVNAT, ServiceEntry,
    ServiceKeyV4, select::slot_for_hash,
};

use crate::{
    ct,
    maps::{LB4_BACKENDS, LB4_REVNAT, LB4_SERVICES, count_flow, stat},
    nat::{self, Field},
    parse::{self, Packet, Parsed, TCP_ACK, TCP_RST, TCP_SYN},
    reject,
};

const OK: i32 = TC_ACT_OK;
const SHOT: i32 = TC_ACT_SHOT;

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let p = match parse::parse(ctx) {
        Parsed::Ok(p) => p,
        Parsed::Unparsed => {
            stat(STAT_PASS_UNPARSED);
            return OK;
        }
        Parsed::NotIpv4 | Parsed::OtherProto => return OK,
    };
    stat(STAT_PACKETS);

    if let Some(verdict) = reply(ctx, &p) {
        return verdict;
    }

    let key = ServiceKeyV4 {
        addr: p.daddr,
        dport: p.dport,
        backend_slot: 0,
        proto: p.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let Some(svc) = LB4_SERVICES.get_ptr(key) else {
        return OK;
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let svc: ServiceEntry = unsafe { *svc };
    if svc.count == 0 {
        return no_backend(ctx, &p);
    }
    forward(ctx, &p, &key, &svc)
}

/// Reply of a load-balanced flow (backend -> client): source becomes the frontend again.
#[inline(always)]
fn reply(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let ct = ct::lookup_touch(&ct::packet_key(p, CT_DIR_REPLY), p)?;
    // Frontend deleted since: the flow is no longer ours, leave the packet to the kernel.
    let rn = LB4_REVNAT.get_ptr(ct.rev_nat_id)?;
    // SAFETY: pointer from a successful lookup; copied out at once.
    let rn = unsafe { *rn };
    if nat::rewrite(ctx, p, Field::Src, rn.addr, rn.port).is_err() {
        return Some(SHOT);
    }
    stat(STAT_REVNAT);
    count_flow(ct.rev_nat_id, ct.backend_id, ctx.len());
    Some(OK)
}

#[inline(always)]
fn no_backend(ctx: &TcContext, p: &Packet) -> i32 {
    // Never answer a reset with a reset.
    let res = if p.proto == IPPROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            Err(0)
        } else {
            reject::tcp_reset(ctx, p)
        }
    } else {
        reject::icmp_port_unreachable(ctx, p)
    };
    match res {
        Ok(verdict) => {
            stat(STAT_NO_BACKEND);
            info!(
                ctx,
                "reject {:i}:{} -> {:i}:{} proto {}: no backends",
                u32::from_be(p.saddr),
                u16::from_be(p.sport),
                u32::from_be(p.daddr),
                u16::from_be(p.dport),
                p.proto
            );
            verdict
        }
        Err(_) => {
            stat(STAT_NO_BACKEND_DROP);
            SHOT
        }
    }
}

/// Picks the backend of a client packet (conntrack first) and DNATs to it.
#[inline(always)]
fn forward(ctx: &TcContext, p: &Packet, key: &ServiceKeyV4, svc: &ServiceEntry) -> i32 {
    let mut chosen: Option<(u32, BackendV4)> = None;
    if let Some(ct) = ct::lookup_touch(&ct::packet_key(p, CT_DIR_FORWARD), p) {
        match LB4_BACKENDS.get_ptr(ct.backend_id) {
            Some(be) => {
                stat(STAT_CT_HIT);
                // SAFETY: pointer from a successful lookup; copied out at once.
                chosen = Some((ct.backend_id, unsafe { *be }));
            }
            None => stat(STAT_CT_RESELECT),
        }
    }
    let (backend_id, be, new_flow) = match chosen {
        Some((id, be)) => (id, be, false),
        None => {
            // SAFETY: helper without arguments.
            let slot = slot_for_hash(unsafe { bpf_get_prandom_u32() }, svc.count);
            // A missing slot or backend means the agent is midway through an update; dropping
            // makes the client retransmit into the finished state.
            let Some(entry) = LB4_SERVICES.get_ptr(key.with_slot(slot)) else {
                stat(STAT_LOOKUP_MISS);
                return SHOT;
            };
            // SAFETY: pointer from a successful lookup.
            let backend_id = unsafe { (*entry).backend_id };
            let Some(be) = LB4_BACKENDS.get_ptr(backend_id) else {
                stat(STAT_LOOKUP_MISS);
                return SHOT;
            };
            // SAFETY: as above.
            (backend_id, unsafe { *be }, true)
        }
    };

    if new_flow {
        if ct::create(p, be.addr, be.port, backend_id, svc.rev_nat_id) {
            stat(STAT_CT_NEW);
        } else {
            stat(STAT_CT_FULL);
        }
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
    }

    if nat::rewrite(ctx, p, Field::Dst, be.addr, be.port).is_err() {
        return SHOT;
    }
    stat(STAT_DNAT);
    count_flow(svc.rev_nat_id, backend_id, ctx.len());
    OK
}
