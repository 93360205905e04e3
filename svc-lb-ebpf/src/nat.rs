//! Address/port rewrites through the skb helpers. `bpf_l4_csum_replace` knows the skb's checksum
//! state (CHECKSUM_PARTIAL packets from a local veth carry only the pseudo-header sum, which a
//! plain RFC 1624 update would corrupt), so the TC path never does checksum math itself.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use svc_lb_common::IPPROTO_UDP;

use crate::parse::{
    IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet, TCP_CSUM_OFF,
    UDP_CSUM_OFF,
};

pub enum Field {
    /// Destination address and port (DNAT, forward direction).
    Dst,
    /// Source address and port (reverse NAT of replies).
    Src,
}

/// Rewrites (address, port) of `field` from the packet's values to `addr`/`port` (network
/// order), fixing the IP checksum and the L4 checksum (pseudo-header + port). All offsets are
/// constants validated by the parser, so the helpers only fail on internal errors.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, field: Field, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match field {
        Field::Dst => (p.daddr, p.dport, IP_DADDR_OFF, L4_DPORT_OFF),
        Field::Src => (p.saddr, p.sport, IP_SADDR_OFF, L4_SPORT_OFF),
    };
    // UDP: a zero checksum means "none" and MARK_MANGLED_0 keeps it zero (and turns a computed
    // zero into 0xffff).
    let (csum_off, mangled) = if p.proto == IPPROTO_UDP {
        (UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (TCP_CSUM_OFF, 0)
    };
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(addr_off, &addr, 0)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)?;
        ctx.store(port_off, &port, 0)?;
    }
    Ok(())
}
