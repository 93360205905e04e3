//! Named constants used on both sides: protocol numbers, frontend kinds, backend states and the
//! indexes of the global per-CPU counters.

/// IP protocol numbers stored in map keys (`proto` fields). ICMP: the rejects the datapath
/// sends.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// SCTP: its CRC32c checksum covers no IP pseudo-header, so only address rewrites are done
/// (a port rewrite would need the CRC over the whole packet recomputed).
pub const IPPROTO_SCTP: u8 = 132;

/// `ServiceKeyV4::scope`: which slot set of a frontend a key addresses. `SCOPE_EXTERNAL` is
/// every frontend's own entry. A NodePort/ExternalIP/LoadBalancer frontend with traffic policy
/// Local (`SVC_F_LOCAL`, node-local slots) also has a `SCOPE_INTERNAL` twin whose slots hold
/// every ready endpoint: traffic from inside the cluster (sources in `LB4_LOCAL_SRC`, and node
/// processes through the socket LB) uses it, like kube-proxy's short-circuit.
pub const SCOPE_EXTERNAL: u8 = 0;
/// The in-cluster twin of a traffic-policy-Local frontend (see `SCOPE_EXTERNAL`).
pub const SCOPE_INTERNAL: u8 = 1;

/// `ServiceEntry::flags`: what kind of frontend this is (one Service yields several).
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
/// A NodePort on one of the node's addresses.
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
/// One of the Service's `spec.externalIPs`.
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
/// A LoadBalancer ingress IP (`status.loadBalancer.ingress`).
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
/// Not a kind: new flows pick their backend from the frontend's `LB4_MAGLEV` table (by flow
/// hash) instead of a random slot.
pub const SVC_F_MAGLEV: u16 = 1 << 8;
/// Not a kind: only clients in the frontend's `LB4_SRC_RANGES` prefixes may use it
/// (loadBalancerSourceRanges); other packets are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 9;
/// Not a kind: traffic policy Local, the slots hold this node's endpoints only; with none the
/// frontend drops new flows (other nodes may serve them) instead of refusing them.
pub const SVC_F_LOCAL: u16 = 1 << 10;

/// `BackendV4::state`: takes new flows.
pub const BE_STATE_ACTIVE: u8 = 0;
/// `BackendV4::state`: keeps its established flows (draining), takes no new one.
pub const BE_STATE_TERMINATING: u8 = 1;
/// `BackendV4::state` bit, not a state: the backend runs on another node (its EndpointSlice
/// `nodeName` is not `--node-name`). External traffic (NodePort, ExternalIP, LoadBalancer with
/// externalTrafficPolicy Cluster) to it is SNATed to this node, so the reply comes back here to
/// be reverse-translated.
pub const BE_F_REMOTE: u8 = 1 << 7;
/// The `BE_STATE_*` part of `BackendV4::state`.
pub const BE_STATE_MASK: u8 = !BE_F_REMOTE;

/// `CtKeyV4::dir`: a forward entry is keyed by the client's original tuple (to the frontend),
/// a reply entry by the tuple of the backend's answer (backend -> client).
pub const CT_DIR_FORWARD: u8 = 0;
/// `CtKeyV4::dir` of a reply entry (see `CT_DIR_FORWARD`).
pub const CT_DIR_REPLY: u8 = 1;

/// `CtEntry::flags`: a FIN or RST was seen on this flow.
pub const CT_F_CLOSING: u8 = 1 << 0;
/// `CtEntry::flags`: the flow is also source-NATed to this node (`CtEntry::nat_addr`/`nat_port`).
pub const CT_F_SNAT: u8 = 1 << 1;

/// Source ports SNATed flows get on the node: above Linux's default ephemeral range
/// (32768-60999), so they never take the 4-tuple of one of the node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Highest SNAT source port (see `SNAT_PORT_MIN`).
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Random ports tried for a new SNATed flow before it is dropped (`STAT_SNAT_FAIL`).
pub const SNAT_PORT_TRIES: u32 = 32;

/// Indexes into the global per-CPU `LB_STATS` array. IPv4 packets the TC program parsed.
pub const STAT_PACKETS: u32 = 0;
/// Forward packets rewritten to a backend.
pub const STAT_DNAT: u32 = 1;
/// Reply packets rewritten back to the frontend address.
pub const STAT_REVNAT: u32 = 2;
/// New flows that created a conntrack entry.
pub const STAT_CT_NEW: u32 = 3;
/// Forward packets that followed an existing conntrack entry.
pub const STAT_CT_HIT: u32 = 4;
/// Established flows whose backend was removed and got a new one.
pub const STAT_CT_RESELECT: u32 = 5;
/// Packets to a frontend without backends that were answered with a reject.
pub const STAT_NO_BACKEND: u32 = 6;
/// Packets to a frontend without backends that could not be turned into a reject (dropped).
pub const STAT_NO_BACKEND_DROP: u32 = 7;
/// Packets left alone because they cannot be parsed safely (truncated, fragments, IP options).
pub const STAT_PASS_UNPARSED: u32 = 8;
/// Slot or backend missing while the agent updates a frontend (packet dropped, flow retries).
pub const STAT_LOOKUP_MISS: u32 = 9;
/// Conntrack map insert failed.
pub const STAT_CT_FULL: u32 = 10;
/// Packets to a LoadBalancer frontend from outside its loadBalancerSourceRanges (dropped).
pub const STAT_SRC_RANGE_DROP: u32 = 11;
/// New flows to a traffic-policy-Local frontend without a local endpoint (dropped).
pub const STAT_NO_LOCAL_DROP: u32 = 12;
/// New flows to a backend on another node that were SNATed to this node.
pub const STAT_SNAT: u32 = 13;
/// New flows that needed SNAT but got no source address (no route to the backend) or no free
/// port (dropped).
pub const STAT_SNAT_FAIL: u32 = 14;
/// Entries of `LB_STATS` (room for one more counter than `STAT_NAMES` has).
pub const STAT_COUNT: u32 = 16;

/// Human names for the counters, in index order (for `svc-lb debug stats`).
pub const STAT_NAMES: [&str; 15] = [
    "packets",
    "dnat",
    "revnat",
    "ct_new",
    "ct_hit",
    "ct_reselect",
    "no_backend_reject",
    "no_backend_drop",
    "pass_unparsed",
    "lookup_miss",
    "ct_full",
    "src_range_drop",
    "no_local_drop",
    "snat",
    "snat_fail",
];
