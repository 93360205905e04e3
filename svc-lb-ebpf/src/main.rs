//! svc-lb datapath. Entry points only; the logic lives in the modules. The function names are
//! the program names the agent looks up: `svc_lb_common::programs` (checked against this object by
//! `tests/tests/prog_contract.rs`).
#![no_std]
#![no_main]

mod affinity;
mod ct;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// Attached at TC ingress of every node interface (see `tc` for the semantics).
#[classifier]
pub fn svc_lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

/// Optional XDP DNAT for NodePort/ExternalIP/LoadBalancer frontends; not attached by default.
#[xdp]
pub fn svc_lb_xdp(ctx: XdpContext) -> u32 {
    xdp::xdp(&ctx)
}

/// Socket LB (see `sock`): attached to a cgroup v2 (default the root) so processes of the node
/// reach Services; TCP and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn svc_lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// Socket LB: unconnected UDP (sendto/sendmsg with an address).
#[cgroup_sock_addr(sendmsg4)]
pub fn svc_lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// Socket LB: the source of a received datagram reads as the frontend again.
#[cgroup_sock_addr(recvmsg4)]
pub fn svc_lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// Socket LB: getpeername() reports the frontend, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn svc_lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// Benchmark baseline (`cargo xtask bench`): an empty TC program, so BPF_PROG_TEST_RUN numbers
/// of `svc_lb_tc_ingress` can be compared with the harness overhead in the same run. Never attached.
#[classifier]
pub fn svc_lb_tc_pass(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_OK
}

/// Benchmark baseline: an empty XDP program (see `svc_lb_tc_pass`). Never attached.
#[xdp]
pub fn svc_lb_xdp_pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
