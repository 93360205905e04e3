//! TC ingress load balancing: reverse NAT of backend replies, DNAT of client packets to a
//! frontend, rejects for frontends without backends.
//!
//! Invariant: every map lookup a decision needs happens before the first write to the packet,
//! so a packet is either rewritten completely or not at all.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use svc_lb_common::{
    CT_DIR_REPLY, CT_F_SNAT, IPPROTO_TCP, STAT_DNAT, STAT_NO_BACKEND, STAT_NO_BACKEND_DROP,
    STAT_NO_LOCAL_DROP, STAT_PACKETS, STAT_PASS_UNPARSED, STAT_REVNAT, STAT_SRC_RANGE_DROP,
    SVC_F_LOCAL, ServiceEntry, ServiceKeyV4,
};

use crate::{
    ct,
    lb::{self, Pick},
    maps::{LB4_REVNAT, count_flow, stat},
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

    let key = lb::frontend_key(&p);
    let Some(svc) = lb::frontend(&key) else {
        return OK;
    };
    if !lb::source_allowed(&p, &svc) {
        stat(STAT_SRC_RANGE_DROP);
        return SHOT;
    }
    let (key, svc) = lb::scoped(&p, key, svc);
    if svc.count == 0 {
        // Established connections to a draining backend finish; new ones are refused.
        return match lb::established(&p) {
            Some(found) => dnat(ctx, &p, &svc, found),
            None if svc.flags & SVC_F_LOCAL != 0 => {
                stat(STAT_NO_LOCAL_DROP);
                SHOT
            }
            None => no_backend(ctx, &p),
        };
    }
    forward(ctx, &p, &key, &svc)
}

/// Reply of a load-balanced flow (backend -> client): source becomes the frontend again, and
/// for a SNATed flow the destination (this node) becomes the client again.
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
    if ct.flags & CT_F_SNAT != 0
        && nat::rewrite(ctx, p, Field::Dst, ct.nat_addr, ct.nat_port).is_err()
    {
        return Some(SHOT);
    }
    stat(STAT_REVNAT);
    count_flow(ct.rev_nat_id, ct.backend_id, ctx.len());
    Some(OK)
}

/// Refuses a packet of a frontend without backends like kube-proxy's `REJECT` rule: ICMP port
/// unreachable for UDP and for a TCP SYN (the client sees ECONNREFUSED either way). Other TCP
/// segments belong to a connection we have no state for: an RST ends it at once, where an
/// ICMP error would be ignored by the established socket until it times out.
#[inline(always)]
fn no_backend(ctx: &TcContext, p: &Packet) -> i32 {
    let res = if p.proto == IPPROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            // Never answer a reset.
            Err(0)
        } else if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            reject::icmp_port_unreachable(ctx, p)
        } else {
            reject::tcp_reset(ctx, p)
        }
    } else {
        reject::icmp_port_unreachable(ctx, p)
    };
    match res {
        Ok(verdict) => {
            stat(STAT_NO_BACKEND);
            debug!(
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
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match lb::pick_backend(ctx, ifindex, p, key, svc) {
        Some(found) => dnat(ctx, p, svc, found),
        None => SHOT,
    }
}

/// Rewrites the destination to the backend (and the source to this node for a SNATed flow)
/// and counts the packet. A SNATed packet then carries one of this node's addresses as its
/// source; the kernel forwards it because the agent sets accept_local on attached interfaces.
#[inline(always)]
fn dnat(ctx: &TcContext, p: &Packet, svc: &ServiceEntry, pick: Pick) -> i32 {
    if nat::rewrite(ctx, p, Field::Dst, pick.be.addr, pick.be.port).is_err() {
        return SHOT;
    }
    if let Some(snat) = pick.snat
        && nat::rewrite(ctx, p, Field::Src, snat.addr, snat.port).is_err()
    {
        return SHOT;
    }
    stat(STAT_DNAT);
    count_flow(svc.rev_nat_id, pick.backend_id, ctx.len());
    OK
}
