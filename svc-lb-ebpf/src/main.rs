//! svc-lb datapath. Entry points only; the logic lives in the modules.
#![no_std]
#![no_main]

mod ct;
mod maps;
mod nat;
mod parse;
mod reject;
mod tc;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Attached at TC ingress of every node interface (see `tc` for the semantics).
#[classifier]
pub fn svc_lb_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
