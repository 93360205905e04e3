//! Names of the programs in the eBPF object (`svc-lb-ebpf/src/main.rs`: the function names,
//! which aya uses as program names). The agent, the tests and the benchmarks look programs up
//! by these; a program test fails when the object's programs and [`ALL_PROGRAMS`] differ.

/// TC ingress of every node interface: DNAT to a backend, reverse NAT of replies.
pub const TC_INGRESS_PROG: &str = "svc_lb_tc_ingress";
/// Optional XDP DNAT of NodePort/ExternalIP/LoadBalancer frontends (`svc-lb run --xdp`).
pub const XDP_PROG: &str = "svc_lb_xdp";
/// Socket LB, cgroup `connect4`: TCP and connected UDP of the node's own processes.
pub const SOCK_CONNECT4_PROG: &str = "svc_lb_sock_connect4";
/// Socket LB, cgroup `sendmsg4`: unconnected UDP.
pub const SOCK_SENDMSG4_PROG: &str = "svc_lb_sock_sendmsg4";
/// Socket LB, cgroup `recvmsg4`: a received datagram's source reads as the frontend.
pub const SOCK_RECVMSG4_PROG: &str = "svc_lb_sock_recvmsg4";
/// Socket LB, cgroup `getpeername4`: the peer reads as the frontend.
pub const SOCK_GETPEERNAME4_PROG: &str = "svc_lb_sock_getpeername4";
/// Benchmark baseline: an empty TC program (never attached).
pub const TC_PASS_PROG: &str = "svc_lb_tc_pass";
/// Benchmark baseline: an empty XDP program (never attached).
pub const XDP_PASS_PROG: &str = "svc_lb_xdp_pass";

/// Every program of the eBPF object.
pub const ALL_PROGRAMS: [&str; 8] = [
    TC_INGRESS_PROG,
    XDP_PROG,
    SOCK_CONNECT4_PROG,
    SOCK_SENDMSG4_PROG,
    SOCK_RECVMSG4_PROG,
    SOCK_GETPEERNAME4_PROG,
    TC_PASS_PROG,
    XDP_PASS_PROG,
];
