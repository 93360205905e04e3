//! Address/port rewrites. The L4 checksum goes through `bpf_l4_csum_replace`, which knows the
//! skb's checksum state: CHECKSUM_PARTIAL packets from a local veth carry only the pseudo-header
//! sum (a plain RFC 1624 update of the port would corrupt it), and CHECKSUM_COMPLETE packets need
//! `skb->csum` adjusted for the pseudo-header change. The rest needs no helper: the addresses and
//! ports are written in place (the parser already made the headers linear) and the IPv4 header
//! checksum, always a full software checksum, is updated with RFC 1624 math. Three of the five
//! helper calls of a rewrite go away that way (about 70 ns under BPF_PROG_TEST_RUN).
//!
//! The price of direct writes: the verifier gives the program a prologue that unclones a cloned
//! skb before it runs (what `bpf_skb_store_bytes` did only for rewritten packets), so while a
//! packet socket clones ingress traffic (tcpdump on the interface) every packet's header is
//! copied once. Cilium's programs pay the same.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use svc_lb_common::{IPPROTO_SCTP, IPPROTO_UDP, csum};

use crate::parse::{
    IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet, TCP_CSUM_OFF,
    UDP_CSUM_OFF, ptr_at,
};

pub enum Field {
    /// Destination address and port (DNAT, forward direction).
    Dst,
    /// Source address and port (reverse NAT of replies).
    Src,
}

/// Error of a rewrite whose header is not in the linear area (cannot happen after `parse`,
/// which made it linear; kept so a violated assumption drops the packet instead of faulting).
const E_NOT_LINEAR: i64 = -22;
/// Error of an SCTP rewrite that would change a port (see `rewrite_sctp`).
const E_SCTP_PORT: i64 = -95;

/// Rewrites (address, port) of `field` from the packet's values to `addr`/`port` (network
/// order), fixing the IP checksum and the L4 checksum (pseudo-header + port). All offsets are
/// constants validated by the parser.
///
/// Every location is bounds-checked before the first write, so a packet is rewritten
/// completely or not at all.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, field: Field, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match field {
        Field::Dst => (p.daddr, p.dport, IP_DADDR_OFF, L4_DPORT_OFF),
        Field::Src => (p.saddr, p.sport, IP_SADDR_OFF, L4_SPORT_OFF),
    };
    if p.proto == IPPROTO_SCTP {
        return rewrite_sctp(ctx, old_addr, old_port, addr_off, addr, port);
    }
    // UDP: a zero checksum means "none" and MARK_MANGLED_0 keeps it zero (and turns a computed
    // zero into 0xffff).
    let (csum_off, mangled) = if p.proto == IPPROTO_UDP {
        (UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (TCP_CSUM_OFF, 0)
    };
    if ptr_at::<u16>(ctx, csum_off).is_none() || ptr_at::<u16>(ctx, port_off).is_none() {
        return Err(E_NOT_LINEAR);
    }
    // The helpers first: they may move packet data (unclone), which invalidates every packet
    // pointer, so the in-place writes below take theirs afterwards.
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)?;
    }
    if old_addr != addr {
        update_u16(ctx, IP_CSUM_OFF, |c| csum::replace4(c, old_addr, addr))?;
        write(ctx, addr_off, addr)?;
    }
    write(ctx, port_off, port)?;
    Ok(())
}

/// SCTP: its CRC32c covers the SCTP packet only (no pseudo-header), so an address rewrite needs
/// just the IP checksum. A port rewrite would need the CRC recomputed over the whole packet,
/// which the datapath does not do: the agent only programs SCTP frontends whose backends use
/// the same port, and anything else is refused here (the packet is dropped, never corrupted).
#[inline(always)]
fn rewrite_sctp(
    ctx: &TcContext,
    old_addr: u32,
    old_port: u16,
    addr_off: usize,
    addr: u32,
    port: u16,
) -> Result<(), i64> {
    if old_port != port {
        return Err(E_SCTP_PORT);
    }
    if old_addr != addr {
        update_u16(ctx, IP_CSUM_OFF, |c| csum::replace4(c, old_addr, addr))?;
        write(ctx, addr_off, addr)?;
    }
    Ok(())
}

/// Writes `v` at `off` in place (bounds checked; unaligned, packet data has no alignment).
#[inline(always)]
fn write<T>(ctx: &TcContext, off: usize, v: T) -> Result<(), i64> {
    let p = ptr_at::<T>(ctx, off).ok_or(E_NOT_LINEAR)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Reads, updates and writes back the native-order u16 at `off` in place (bounds checked).
#[inline(always)]
fn update_u16(ctx: &TcContext, off: usize, f: impl FnOnce(u16) -> u16) -> Result<(), i64> {
    let p = ptr_at::<u16>(ctx, off).ok_or(E_NOT_LINEAR)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { p.write_unaligned(f(p.read_unaligned())) };
    Ok(())
}
