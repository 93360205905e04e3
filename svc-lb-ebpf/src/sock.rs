//! Socket-level load balancing for processes of the node itself (host network namespace), like
//! Cilium's socket LB. Their packets never pass TC ingress of a node interface, so the Service
//! is resolved when the socket names its destination instead:
//!
//! - `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP) rewrite a frontend
//!   address to a backend chosen from the same `LB4_SERVICES` slots the TC program uses, and
//!   remember {socket cookie, backend} -> frontend in `LB4_SOCK_REVNAT`;
//! - `recvmsg4` (source of a received datagram) and `getpeername4` rewrite that backend back to
//!   the frontend, so the application only ever sees the ClusterIP.
//!
//! The packets then travel between the node and the backend with real addresses: no per-packet
//! NAT, no conntrack entry. sessionAffinity ClientIP applies with the socket's network
//! namespace as the client (the source address is not chosen yet at connect time; the
//! processes of one namespace share their addresses, so they share a backend as with
//! kube-proxy). Not applied here (documented): Maglev tables (a random slot is used), and
//! frontends with loadBalancerSourceRanges (left to the packet path, which checks the client
//! address).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use svc_lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, STAT_LOOKUP_MISS, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, ServiceKeyV4,
    SockRevNatKeyV4, SockRevNatV4, select::slot_for_hash,
};

use crate::{
    affinity, lb,
    maps::{LB4_BACKENDS, LB4_REVNAT, LB4_SERVICES, LB4_SOCK_REVNAT, stat},
};

/// cgroup sock_addr verdicts: 1 lets the syscall proceed, 0 fails it (with the errno set by
/// `bpf_set_retval`, EPERM otherwise).
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Frontend kinds host traffic is balanced for: all of them, as kube-proxy short-circuits
/// LoadBalancer ingress IPs for in-node clients too.
const KINDS: u16 = SVC_F_CLUSTER_IP | SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

#[inline(always)]
fn reject(errno: i32) -> i32 {
    // SAFETY: helper with a plain integer argument (allowed in cgroup programs, kernel >= 5.18).
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer of a cgroup sock_addr program.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The sessionAffinity "client" of a socket: its network namespace (cookie folded to 32 bits;
/// shares `LB4_AFFINITY` with the client addresses of the packet path, a coincidental equal
/// value only makes the two share a backend).
#[inline(always)]
fn affinity_client(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the context pointer of a cgroup sock_addr program (kernel >= 5.7).
    let c = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (c ^ (c >> 32)) as u32
}

/// connect4 / sendmsg4: a frontend destination becomes one of its backends.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable in every
    // sock_addr hook.
    let (addr, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let proto = match protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return ALLOW,
    };
    // user_port holds the port in network order in its low 16 bits.
    let dport = port as u16;
    let key = ServiceKeyV4 {
        addr,
        dport,
        backend_slot: 0,
        proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    let Some(svc) = lb::frontend(&key) else {
        return ALLOW;
    };
    if svc.flags & KINDS == 0 || svc.flags & SVC_F_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    // Node processes are inside the cluster: traffic policy Local does not restrict them
    // (kube-proxy sends node-originated traffic to the Service's cluster chain).
    let (key, svc) = lb::internal_twin(&key, &svc).unwrap_or((key, svc));
    if svc.count == 0 {
        // No (local, for traffic policy Local) backend: fail fast like kube-proxy's REJECT.
        return reject(ECONNREFUSED);
    }
    let client = affinity_client(ctx);
    let remembered = if svc.affinity_timeout_s != 0 {
        affinity::lookup(client, &svc)
    } else {
        None
    };
    let (backend_id, be) = match remembered {
        Some(found) => found,
        None => {
            // SAFETY: helper without arguments.
            let slot = slot_for_hash(unsafe { bpf_get_prandom_u32() }, svc.count);
            let Some(entry) = LB4_SERVICES.get_ptr(key.with_slot(slot)) else {
                // The agent is midway through an update of this frontend.
                stat(STAT_LOOKUP_MISS);
                return reject(EHOSTUNREACH);
            };
            // SAFETY: pointer from a successful lookup.
            let backend_id = unsafe { (*entry).backend_id };
            let Some(be) = LB4_BACKENDS.get_ptr(backend_id) else {
                stat(STAT_LOOKUP_MISS);
                return reject(EHOSTUNREACH);
            };
            // SAFETY: as above; copied out at once.
            (backend_id, unsafe { *be })
        }
    };
    if svc.affinity_timeout_s != 0 {
        affinity::remember(client, svc.rev_nat_id, backend_id);
    }
    let rkey = SockRevNatKeyV4 {
        cookie: cookie(ctx),
        addr: be.addr,
        port: be.port,
        _pad: 0,
    };
    let rval = SockRevNatV4 {
        addr,
        port: dport,
        _pad: 0,
        rev_nat_id: svc.rev_nat_id,
    };
    // A failed insert (only on memory pressure: the map is LRU) costs the reverse translation
    // of this socket's peer name, not its connectivity.
    let _ = LB4_SOCK_REVNAT.insert(rkey, rval, 0);
    // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = be.addr;
        (*sa).user_port = u32::from(be.port);
    }
    if proto == IPPROTO_TCP {
        debug!(
            ctx,
            "socket connect {:i}:{} => backend {} {:i}:{}",
            u32::from_be(addr),
            u16::from_be(dport),
            backend_id,
            u32::from_be(be.addr),
            u16::from_be(be.port)
        );
    }
    ALLOW
}

/// recvmsg4 / getpeername4: a backend peer the socket was sent to by [`forward`] shows up as
/// the frontend the application asked for. The hooks cannot fail the syscall (must return 1).
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid bpf_sock_addr, readable fields.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevNatKeyV4 {
        cookie: cookie(ctx),
        addr,
        port: port as u16,
        _pad: 0,
    };
    let Some(fe) = LB4_SOCK_REVNAT.get_ptr(key) else {
        return ALLOW;
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let fe = unsafe { *fe };
    // Only while the frontend still exists with that address (ids are reused after deletes).
    let Some(rn) = LB4_REVNAT.get_ptr(fe.rev_nat_id) else {
        return ALLOW;
    };
    // SAFETY: as above.
    let rn = unsafe { *rn };
    if rn.addr != fe.addr || rn.port != fe.port {
        return ALLOW;
    }
    // SAFETY: user_ip4/user_port are writable in recvmsg4 and getpeername4.
    unsafe {
        (*sa).user_ip4 = fe.addr;
        (*sa).user_port = u32::from(fe.port);
    }
    ALLOW
}
