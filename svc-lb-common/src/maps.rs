//! Map names, sizes, keys and values. Layout follows Cilium's slot-indirected LB maps.
//!
//! Byte order: addresses and ports are stored in network byte order, exactly as they appear in
//! the packet, so the datapath compares raw header words. Ids, slots and counts are host order.
//! Every type has explicit padding that must be zero, because hash keys are hashed bytewise.

use core::net::Ipv4Addr;

use crate::maglev::MAGLEV_TABLE_SIZE;

/// Frontend key (slot 0) → `ServiceEntry` with the backend count; backend slots `1..=count`
/// → `ServiceEntry` with `backend_id`.
pub const SERVICES_MAP: &str = "LB4_SERVICES";
/// Backend id → backend address.
pub const BACKENDS_MAP: &str = "LB4_BACKENDS";
/// Rev-NAT id → the frontend address replies are rewritten to.
pub const REVNAT_MAP: &str = "LB4_REVNAT";
/// LRU conntrack: flow tuple → backend id + rev-NAT id.
pub const CT_MAP: &str = "LB4_CT";
/// Per-CPU packet/byte counters, array indexed by rev-NAT id (one per frontend).
pub const SVC_STATS_MAP: &str = "LB4_SVC_STATS";
/// Per-CPU packet/byte counters, array indexed by backend id.
pub const BE_STATS_MAP: &str = "LB4_BE_STATS";
/// Per-CPU global counters, indexed by `STAT_*`.
pub const STATS_MAP: &str = "LB_STATS";
/// Rev-NAT id → "namespace/name:port" of the Service, for debugging only (datapath never reads).
pub const SVC_NAMES_MAP: &str = "LB_SVC_NAMES";
/// Rev-NAT id → Maglev lookup table of backend ids (frontends with `SVC_F_MAGLEV`).
pub const MAGLEV_MAP: &str = "LB4_MAGLEV";
/// LPM trie {rev-NAT id, client prefix} of frontends with `SVC_F_SOURCE_RANGES`.
pub const SRC_RANGES_MAP: &str = "LB4_SRC_RANGES";
/// LRU sessionAffinity ClientIP: {client address, rev-NAT id} → backend id + last use.
pub const AFFINITY_MAP: &str = "LB4_AFFINITY";
/// LPM trie of "in-cluster" source prefixes (`--cluster-cidr` and this node's addresses; key
/// data = IPv4 address, network order; value unused): their traffic to a traffic-policy-Local
/// external frontend uses the frontend's `SCOPE_INTERNAL` slots (every ready endpoint).
pub const LOCAL_SRC_MAP: &str = "LB4_LOCAL_SRC";
/// LRU {socket cookie, backend address, backend port} → frontend it was rewritten from (socket
/// LB, see `sock`).
pub const SOCK_REVNAT_MAP: &str = "LB4_SOCK_REVNAT";

/// Every map of the eBPF object, each pinned by name in the pin directory: the agent checks
/// them after loading, `svc-lb uninstall` removes them, and a program test fails when the
/// object's maps (`svc-lb-ebpf/src/maps.rs`, whose `#[map(name = ...)]` needs literals) and
/// this list differ.
pub const ALL_MAPS: [&str; 13] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    REVNAT_MAP,
    CT_MAP,
    SVC_STATS_MAP,
    BE_STATS_MAP,
    STATS_MAP,
    SVC_NAMES_MAP,
    AFFINITY_MAP,
    MAGLEV_MAP,
    SRC_RANGES_MAP,
    LOCAL_SRC_MAP,
    SOCK_REVNAT_MAP,
];

/// Prefixes in `LB4_LOCAL_SRC`.
pub const MAX_LOCAL_SRC: u32 = 1_024;

/// Size of `LB4_SERVICES` (frontends and their backend slots) in the object; the agent sizes
/// the maps it creates from its `--max-*` flags.
pub const MAX_SERVICE_ENTRIES: u32 = 262_144;
/// Backend ids are `1..MAX_BACKENDS` and index `LB4_BE_STATS`; 0 means "no backend".
pub const MAX_BACKENDS: u32 = 65_536;
/// Identifies one frontend (Service port on one address): keys `LB4_REVNAT`, `LB4_MAGLEV`,
/// `LB_SVC_NAMES`, indexes `LB4_SVC_STATS`. 32 bits so more than 65,535 frontends fit
/// (Cilium's `rev_nat_index` is 16 bits, which caps a cluster at 64k Service ports).
pub type RevNatId = u32;
/// Rev-NAT ids are `1..MAX_REVNAT` and index `LB4_SVC_STATS`; 0 is never allocated.
pub const MAX_REVNAT: u32 = 65_536;
/// Size of `LB4_CT` in the object (LRU: the least recently used flows go when it is full).
pub const MAX_CT_ENTRIES: u32 = 262_144;
/// Source prefixes over all LoadBalancer frontends.
pub const MAX_SRC_RANGES: u32 = 65_536;
/// Bits of `SrcRangeKeyV4` before the address (the rev-NAT id), always matched in full:
/// an LPM key for prefix `a.b.c.d/n` has prefix length `SRC_RANGE_FIXED_BITS + n`.
pub const SRC_RANGE_FIXED_BITS: u32 = 32;
/// Client/frontend pairs remembered for sessionAffinity (LRU; Cilium uses the same size).
pub const MAX_AFFINITY_ENTRIES: u32 = 65_536;
/// Bytes of an `LB_SVC_NAMES` value.
pub const SVC_NAME_LEN: usize = 128;

/// `LB4_SERVICES` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyV4 {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend L4 port, network order.
    pub dport: u16,
    /// 0 = the frontend itself; `1..=count` = backend slots.
    pub backend_slot: u16,
    /// `IPPROTO_TCP` / `IPPROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    /// Zero (hashed with the key).
    pub _pad: [u8; 2],
}

/// `LB4_SERVICES` value. Slot 0 uses `count`, `rev_nat_id`, `flags`; backend slots use
/// `backend_id` (and repeat `rev_nat_id` so a slot can be checked against its frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceEntry {
    /// The backend of this slot (backend slots only).
    pub backend_id: u32,
    /// Number of backend slots (slot 0 only). 0 = reject new flows.
    pub count: u16,
    /// `SVC_F_*`.
    pub flags: u16,
    /// The frontend's rev-NAT id (all slots).
    pub rev_nat_id: RevNatId,
    /// sessionAffinity ClientIP timeout in seconds (slot 0 only), 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// `LB4_BACKENDS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendV4 {
    /// Pod IPv4 address, network order.
    pub addr: u32,
    /// Target port, network order.
    pub port: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `BE_STATE_*`, plus `BE_F_REMOTE`.
    pub state: u8,
}

/// `LB4_REVNAT` value: the frontend a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatV4 {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
}

/// `LB4_CT` key: the tuple as seen on the wire in the entry's direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKeyV4 {
    /// Source address, network order.
    pub saddr: u32,
    /// Destination address, network order.
    pub daddr: u32,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// `IPPROTO_*`.
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    /// Zero (hashed with the key).
    pub _pad: [u8; 2],
}

/// `LB4_CT` value. The same ids are stored in both directions of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtEntry {
    /// The flow's backend.
    pub backend_id: u32,
    /// The frontend replies are rewritten to.
    pub rev_nat_id: RevNatId,
    /// `bpf_ktime_get_ns()` of the last packet (monotonic since boot).
    pub last_seen_ns: u64,
    /// `CT_F_*`.
    pub flags: u8,
    /// Zero.
    pub _pad: u8,
    /// With `CT_F_SNAT` (network order): in the forward entry the node's address and port the
    /// client's source is rewritten to; in the reply entry the client's address and port the
    /// reply's destination is rewritten back to.
    pub nat_port: u16,
    /// With `CT_F_SNAT`: the address that goes with `nat_port` (network order).
    pub nat_addr: u32,
}

/// `LB4_SRC_RANGES` key data (inside the LPM trie's {prefix length, data} key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRangeKeyV4 {
    /// The frontend (always matched in full, see `SRC_RANGE_FIXED_BITS`).
    pub rev_nat_id: RevNatId,
    /// Client address (prefix), network order.
    pub addr: u32,
}

/// `LB4_AFFINITY` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKeyV4 {
    /// Client IPv4 address, network order.
    pub client_addr: u32,
    /// The frontend.
    pub rev_nat_id: RevNatId,
}

/// `LB4_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityEntry {
    /// The backend the client's new connections go to.
    pub backend_id: u32,
    /// Zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new connection that used it; the affinity expires
    /// `affinity_timeout_s` after that (kube-proxy's "recent" list semantics).
    pub last_used_ns: u64,
}

/// `LB4_MAGLEV` value: the backend id owning each table position (see `maglev`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend id by table position.
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
}

impl Default for MaglevTable {
    fn default() -> Self {
        Self {
            backend_ids: [0; MAGLEV_TABLE_SIZE],
        }
    }
}

/// A summary: 16381 ids would drown every log line that prints a map write.
impl core::fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let ids = &self.backend_ids;
        write!(f, "MaglevTable[{}, {}, {}, ...]", ids[0], ids[1], ids[2])
    }
}

/// `LB4_SVC_STATS` / `LB4_BE_STATS` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Their bytes (skb length).
    pub bytes: u64,
}

/// `LB_SVC_NAMES` value: NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcName {
    /// The name's bytes, NUL-padded.
    pub name: [u8; SVC_NAME_LEN],
}

const _: () = assert!(core::mem::size_of::<ServiceKeyV4>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 16);
const _: () = assert!(core::mem::size_of::<BackendV4>() == 8);
const _: () = assert!(core::mem::size_of::<RevNatV4>() == 8);
const _: () = assert!(core::mem::size_of::<CtKeyV4>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityKeyV4>() == 8);
const _: () = assert!(core::mem::size_of::<SrcRangeKeyV4>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_TABLE_SIZE);
const _: () = assert!(core::mem::size_of::<SvcName>() == SVC_NAME_LEN);

/// Network-order `u32` of an address, as stored in maps and read from packets.
#[inline(always)]
pub fn ip_to_net(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address of a network-order `u32` (inverse of `ip_to_net`).
#[inline(always)]
pub fn ip_from_net(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// Network-order `u16` of a port, as stored in maps and read from packets.
#[inline(always)]
pub fn port_to_net(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The port of a network-order `u16` (inverse of `port_to_net`).
#[inline(always)]
pub fn port_from_net(raw: u16) -> u16 {
    u16::from_be_bytes(raw.to_ne_bytes())
}

impl ServiceKeyV4 {
    /// The key of `addr:port` (host order in, network order stored) for one slot.
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8, scope: u8, backend_slot: u16) -> Self {
        Self {
            addr: ip_to_net(addr),
            dport: port_to_net(port),
            backend_slot,
            proto,
            scope,
            _pad: [0; 2],
        }
    }

    /// The frontend address.
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_net(self.addr)
    }

    /// The frontend port, host order.
    pub fn port(&self) -> u16 {
        port_from_net(self.dport)
    }

    /// The same frontend's key for another slot.
    pub fn with_slot(mut self, backend_slot: u16) -> Self {
        self.backend_slot = backend_slot;
        self
    }
}

impl BackendV4 {
    /// A backend at `addr:port` (host order in, network order stored).
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8, state: u8) -> Self {
        Self {
            addr: ip_to_net(addr),
            port: port_to_net(port),
            proto,
            state,
        }
    }

    /// The backend address.
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_net(self.addr)
    }

    /// The backend port, host order.
    pub fn port_host(&self) -> u16 {
        port_from_net(self.port)
    }

    /// May take new flows (`BE_STATE_ACTIVE`, whatever its location).
    #[inline(always)]
    pub fn is_active(&self) -> bool {
        self.state & crate::flags::BE_STATE_MASK == crate::flags::BE_STATE_ACTIVE
    }

    /// Runs on another node (`BE_F_REMOTE`).
    #[inline(always)]
    pub fn is_remote(&self) -> bool {
        self.state & crate::flags::BE_F_REMOTE != 0
    }
}

impl RevNatV4 {
    /// The frontend `addr:port` (host order in, network order stored).
    pub fn new(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            addr: ip_to_net(addr),
            port: port_to_net(port),
            _pad: 0,
        }
    }

    /// The frontend address.
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_net(self.addr)
    }

    /// The frontend port, host order.
    pub fn port_host(&self) -> u16 {
        port_from_net(self.port)
    }
}

impl AffinityKeyV4 {
    /// The key of `client` for one frontend.
    pub fn new(client: Ipv4Addr, rev_nat_id: RevNatId) -> Self {
        Self {
            client_addr: ip_to_net(client),
            rev_nat_id,
        }
    }

    /// The client address.
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_net(self.client_addr)
    }
}

impl CtKeyV4 {
    /// (source, destination) addresses.
    pub fn ips(&self) -> (Ipv4Addr, Ipv4Addr) {
        (ip_from_net(self.saddr), ip_from_net(self.daddr))
    }

    /// (source, destination) ports, host order.
    pub fn ports(&self) -> (u16, u16) {
        (port_from_net(self.sport), port_from_net(self.dport))
    }
}

impl SvcName {
    /// Truncates at a UTF-8 boundary if longer than the field.
    pub fn new(s: &str) -> Self {
        let mut name = [0u8; SVC_NAME_LEN];
        let mut end = s.len().min(SVC_NAME_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self { name }
    }

    /// The name up to the first NUL (`<invalid utf-8>` if it is not UTF-8).
    pub fn as_str(&self) -> &str {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(SVC_NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid utf-8>")
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)], made only of integers and byte arrays, with explicit padding.
    unsafe impl aya::Pod for ServiceKeyV4 {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendV4 {}
    unsafe impl aya::Pod for RevNatV4 {}
    unsafe impl aya::Pod for CtKeyV4 {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for SvcName {}
    unsafe impl aya::Pod for AffinityKeyV4 {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for SrcRangeKeyV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_bytes_are_network_order() {
        let k = ServiceKeyV4::new(Ipv4Addr::new(10, 96, 0, 10), 80, 6, 0, 3);
        // SAFETY: repr(C) with no implicit padding.
        let bytes: [u8; 12] = unsafe { core::mem::transmute(k) };
        assert_eq!(&bytes[0..4], &[10, 96, 0, 10]);
        assert_eq!(&bytes[4..6], &[0, 80]);
        assert_eq!(u16::from_ne_bytes([bytes[6], bytes[7]]), 3);
        assert_eq!(bytes[8], 6);
        assert_eq!(&bytes[9..12], &[0, 0, 0]);
        assert_eq!(k.ip(), Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(k.port(), 80);
    }

    #[test]
    fn backend_round_trip() {
        let b = BackendV4::new(Ipv4Addr::new(10, 200, 1, 2), 8080, 17, 0);
        assert_eq!(b.ip(), Ipv4Addr::new(10, 200, 1, 2));
        assert_eq!(b.port_host(), 8080);
        assert_eq!(port_to_net(8080).to_ne_bytes(), [0x1f, 0x90]);
    }

    #[test]
    fn svc_name_truncates_on_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let n = SvcName::new(&long);
        assert_eq!(n.as_str().len(), 128);
        assert_eq!(
            SvcName::new("default/web:http").as_str(),
            "default/web:http"
        );
    }
}
