//! The desired dataplane state, independent of where it came from (manifests or the API server)
//! and of how it is stored in the maps. `translate` produces it; `reconcile` turns it into map
//! contents.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use svc_lb_common::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT,
};

/// L4 protocols the datapath balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// ClusterIP only, and only with targetPort == port: the datapath rewrites SCTP addresses
    /// but never ports (its CRC32c would need recomputing).
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
            Proto::Sctp => IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            IPPROTO_SCTP => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        })
    }
}

/// Which Service field a frontend comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub fn flag(self) -> u16 {
        match self {
            FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
            FrontendKind::NodePort => SVC_F_NODE_PORT,
            FrontendKind::ExternalIp => SVC_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
        }
    }

    pub fn from_flags(flags: u16) -> Option<Self> {
        [
            FrontendKind::ClusterIp,
            FrontendKind::NodePort,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ]
        .into_iter()
        .find(|k| flags & k.flag() != 0)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// An address:port/proto a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// The in-cluster twin (`SCOPE_INTERNAL`) of a NodePort/ExternalIP/LoadBalancer frontend
    /// with externalTrafficPolicy Local: same address, every ready endpoint; the datapath uses
    /// it for traffic from inside the cluster only. `false` for every other frontend.
    pub internal: bool,
}

impl FrontendKey {
    /// The `LB4_SERVICES` scope of this key.
    pub fn scope(&self) -> u8 {
        if self.internal {
            SCOPE_INTERNAL
        } else {
            SCOPE_EXTERNAL
        }
    }

    /// The in-cluster twin of this key.
    pub fn internal_twin(&self) -> FrontendKey {
        FrontendKey {
            internal: true,
            ..*self
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)?;
        if self.internal {
            f.write_str(" (in-cluster)")?;
        }
        Ok(())
    }
}

/// A pod address:targetPort traffic is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// `namespace/name:port` of the Service port a frontend belongs to (port = the port's name, or
/// its number when unnamed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortRef {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// How new connections pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbAlgorithm {
    /// A random slot per new connection.
    #[default]
    Random,
    /// Maglev consistent hashing of the connection's addresses and ports: a backend change
    /// moves only about 1/N of the new-connection mapping.
    Maglev,
}

impl LbAlgorithm {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(LbAlgorithm::Random),
            "maglev" => Some(LbAlgorithm::Maglev),
            _ => None,
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        })
    }
}

/// Per-Service balancing options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbPolicy {
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// From the `svc-lb.io/lb-algorithm` annotation; `None` = the agent's default.
    pub algorithm: Option<LbAlgorithm>,
    /// loadBalancerSourceRanges (LoadBalancer frontends only): client prefixes allowed, as
    /// (network address with host bits cleared, prefix length), sorted. Empty = everyone.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// Traffic policy Local: `backends` are this node's endpoints only, and without any the
    /// frontend drops (other nodes may still serve the Service) instead of refusing.
    pub local_only: bool,
    /// Addresses of `backends` on another node (EndpointSlice `nodeName` / Pod `spec.nodeName`
    /// set and not `--node-name`): external traffic to them is SNATed to this node. Empty
    /// without `--node-name`; endpoints without a node name count as local.
    pub remote_backends: BTreeSet<Ipv4Addr>,
}

/// One frontend and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub service: ServicePortRef,
    /// Sorted and without duplicates. Empty = reject new connections.
    pub backends: Vec<BackendAddr>,
    pub policy: LbPolicy,
}

/// Everything the dataplane should do, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}
