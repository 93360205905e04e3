//! Socket-level load balancing (cgroup `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4`): the
//! reverse map that lets a socket whose destination was rewritten to a backend still see the
//! frontend as its peer, like Cilium's `LB4_REVERSE_NAT_SK` map.

use crate::maps::RevNatId;

/// Sockets remembered at once; LRU, so closed sockets age out without any cleanup.
pub const MAX_SOCK_REVNAT: u32 = 262_144;

/// `LB4_SOCK_REVNAT` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNatKeyV4 {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// Backend IPv4 address the socket was sent to, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    /// Zero (hashed with the key).
    pub _pad: u16,
}

/// `LB4_SOCK_REVNAT` value: the frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockRevNatV4 {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
    /// The frontend's rev-NAT id.
    pub rev_nat_id: RevNatId,
}

const _: () = assert!(core::mem::size_of::<SockRevNatKeyV4>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNatV4>() == 12);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: repr(C), only integer fields, no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for SockRevNatKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_has_no_hidden_padding() {
        let k = SockRevNatKeyV4 {
            cookie: 0x0102_0304_0506_0708,
            addr: u32::from_ne_bytes([10, 244, 1, 2]),
            port: 5000u16.to_be(),
            _pad: 0,
        };
        // SAFETY: repr(C), 16 bytes, every byte initialised.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(k) };
        assert_eq!(&bytes[8..12], &[10, 244, 1, 2]);
        assert_eq!(&bytes[12..14], &5000u16.to_be_bytes());
        assert_eq!(&bytes[14..16], &[0, 0]);
    }
}
