//! Validating a Service and working out its frontends, port by port.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::core::v1::{Node, Service, ServicePort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tracing::debug;

use super::{Rejected, TranslateConfig};
use crate::{
    k8s::namespace,
    model::{FrontendKey, FrontendKind, LbAlgorithm, LbPolicy, Proto},
};

/// Annotation choosing the backend selection of one Service (`random` or `maglev`).
pub const LB_ALGORITHM_ANNOTATION: &str = "svc-lb.io/lb-algorithm";
/// kube-proxy's default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for timeoutSeconds (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// A valid Service, ready to be turned into frontends.
pub(super) struct ServicePlan<'a> {
    pub service: &'a Service,
    pub namespace: &'a str,
    pub name: &'a str,
    pub ports: Vec<PortPlan>,
    pub policy: LbPolicy,
    /// externalTrafficPolicy Local: NodePort/ExternalIP/LoadBalancer use this node's endpoints.
    pub external_local: bool,
    /// internalTrafficPolicy Local: ClusterIP uses this node's endpoints.
    pub internal_local: bool,
}

impl ServicePlan<'_> {
    pub fn object(&self) -> String {
        format!("Service {}/{}", self.namespace, self.name)
    }
}

pub(super) struct PortPlan {
    /// `""` when the port has no name (single-port Services).
    pub name: String,
    pub port: u16,
    pub proto: Proto,
    pub target: Target,
    pub frontends: Vec<(FrontendKey, FrontendKind)>,
}

impl PortPlan {
    /// How the port is referred to: its name, or its number when unnamed.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.port.to_string()
        } else {
            self.name.clone()
        }
    }
}

/// The pod port traffic goes to (only used when endpoints come from Pods; EndpointSlices
/// carry resolved numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Number(u16),
    /// A container port name, resolved per Pod.
    Named(String),
}

/// NodePort addresses: the configured ones plus this node's InternalIP/ExternalIP.
pub(super) fn node_addresses<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    cfg: &TranslateConfig,
) -> Vec<Ipv4Addr> {
    let mut ips: BTreeSet<Ipv4Addr> = cfg.node_ips.iter().copied().collect();
    if let Some(node_name) = &cfg.node_name {
        let node = nodes
            .into_iter()
            .find(|n| n.metadata.name.as_ref() == Some(node_name));
        match node {
            None => debug!(
                node_name,
                "no Node object with this name; using --node-ip only"
            ),
            Some(node) => {
                let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
                ips.extend(
                    addresses
                        .into_iter()
                        .flatten()
                        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok()),
                );
            }
        }
    }
    ips.into_iter().collect()
}

/// Validates `svc`; None when it gets no frontends at all (rejections are pushed).
pub(super) fn plan<'a>(
    svc: &'a Service,
    node_ips: &[Ipv4Addr],
    cfg: &TranslateConfig,
    rejected: &mut Vec<Rejected>,
) -> Option<ServicePlan<'a>> {
    let ns = namespace(&svc.metadata);
    let Some(name) = svc.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        rejected.push(Rejected {
            object: format!("Service {ns}/<no name>"),
            reason: "metadata.name is missing".into(),
        });
        return None;
    };
    let object = format!("Service {ns}/{name}");
    let mut reject = |reason: String| {
        rejected.push(Rejected {
            object: object.clone(),
            reason,
        })
    };
    let spec = svc.spec.as_ref()?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let (node_port, load_balancer) = match kind {
        "ClusterIP" => (false, false),
        "NodePort" => (true, false),
        "LoadBalancer" => (true, true),
        "ExternalName" => {
            debug!(service = %object, "ExternalName Service: DNS only, no frontends");
            return None;
        }
        other => {
            reject(format!("unknown spec.type {other:?}"));
            return None;
        }
    };

    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if cluster_ips.contains(&"None") {
        debug!(service = %object, "headless Service: no frontends");
        return None;
    }
    // An invalid address would have been refused by the API server: drop the whole Service
    // rather than program part of something that could not exist in a cluster.
    let cluster_ips = match ipv4s(
        "spec.clusterIPs",
        cluster_ips.into_iter().filter(|ip| !ip.is_empty()),
    ) {
        Ok(ips) => ips,
        Err(reason) => return reject_all(&mut reject, reason),
    };
    let external_ips = spec.external_ips.iter().flatten().map(String::as_str);
    let external_ips = match ipv4s("spec.externalIPs", external_ips) {
        Ok(ips) => ips,
        Err(reason) => return reject_all(&mut reject, reason),
    };
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .filter(|_| load_balancer)
        .into_iter()
        .flatten()
        // ipMode Proxy: the load balancer proxies (e.g. PROXY protocol) and traffic must
        // really go through it, so kube-proxy does not short-cut the IP locally.
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref());
    let mut lb_ips = match ipv4s("status.loadBalancer.ingress", ingress) {
        Ok(ips) => ips,
        Err(reason) => return reject_all(&mut reject, reason),
    };
    let source_ranges = match source_ranges(spec) {
        Ok(ranges) => ranges,
        Err(reason) => {
            if load_balancer {
                reject(reason);
            }
            lb_ips.clear();
            Vec::new()
        }
    };

    let mut ports: Vec<PortPlan> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let label = match p.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => p.port.to_string(),
        };
        let mut port = match port_plan(p, i) {
            Ok(port) => port,
            Err(reason) => {
                reject(format!("port {label}: {reason}"));
                continue;
            }
        };
        if let Some(dup) = ports
            .iter()
            .find(|q| q.port == port.port && q.proto == port.proto)
        {
            reject(format!(
                "port {label}: {}/{} is already defined by port {}",
                port.port,
                port.proto,
                dup.label()
            ));
            continue;
        }
        // Endpoints are matched to ports by name, so names must be unique.
        if !names.insert(port.name.clone()) {
            reject(if port.name.is_empty() {
                format!("port {label}: ports of a multi-port Service must be named")
            } else {
                format!("port {label}: duplicate port name")
            });
            continue;
        }
        let key = |ip| FrontendKey {
            ip,
            port: port.port,
            proto: port.proto,
            internal: false,
        };
        port.frontends.extend(
            cluster_ips
                .iter()
                .map(|&ip| (key(ip), FrontendKind::ClusterIp)),
        );
        // SCTP: ClusterIP only. External frontends would need a port rewrite (NodePort) or
        // SNAT ports for backends on other nodes, neither possible without recomputing the
        // CRC32c; Cilium has the same limit.
        let external_sctp = port.proto == Proto::Sctp
            && (node_port || !external_ips.is_empty() || !lb_ips.is_empty());
        if external_sctp {
            reject(format!(
                "port {label}: SCTP is served on the ClusterIP only; no NodePort, externalIP \
                 or LoadBalancer frontends"
            ));
            ports.push(port);
            continue;
        }
        if node_port {
            match p.node_port {
                Some(np) if u16::try_from(np).is_ok_and(|np| cfg.nodeport_range.contains(np)) => {
                    port.frontends.extend(node_ips.iter().map(|&ip| {
                        let key = FrontendKey {
                            ip,
                            port: np as u16,
                            proto: port.proto,
                            internal: false,
                        };
                        (key, FrontendKind::NodePort)
                    }));
                }
                Some(np) => reject(format!(
                    "port {label}: nodePort {np} is outside the node port range {}-{}; \
                     no NodePort frontend",
                    cfg.nodeport_range.min, cfg.nodeport_range.max
                )),
                // A LoadBalancer may opt out of node ports (allocateLoadBalancerNodePorts).
                None if !load_balancer => reject(format!(
                    "port {label}: type NodePort without spec.ports[].nodePort \
                     (none was allocated); no NodePort frontend"
                )),
                None => {}
            }
        }
        port.frontends.extend(
            external_ips
                .iter()
                .map(|&ip| (key(ip), FrontendKind::ExternalIp)),
        );
        port.frontends.extend(
            lb_ips
                .iter()
                .map(|&ip| (key(ip), FrontendKind::LoadBalancer)),
        );
        ports.push(port);
    }
    let mut policy = policy(svc, &mut reject);
    policy.source_ranges = source_ranges;
    let mut local = |field: &str, value: Option<&str>| -> bool {
        match value {
            None | Some("Cluster") => false,
            Some("Local") if cfg.node_name.is_some() => true,
            Some("Local") => {
                reject(format!(
                    "{field} Local needs --node-name to know which endpoints are local; \
                     using Cluster"
                ));
                false
            }
            Some(other) => {
                reject(format!("unknown {field} {other:?}; using Cluster"));
                false
            }
        }
    };
    // externalTrafficPolicy only means something where there is external traffic.
    let external = node_port || !external_ips.is_empty();
    let external_local = external
        && local(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        );
    let internal_local = local(
        "internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    );
    Some(ServicePlan {
        service: svc,
        namespace: ns,
        name,
        ports,
        policy,
        external_local,
        internal_local,
    })
}

/// sessionAffinity and the lb-algorithm annotation. An invalid value only loses that option
/// (reported); the Service is still programmed.
fn policy(svc: &Service, reject: &mut impl FnMut(String)) -> LbPolicy {
    let mut policy = LbPolicy::default();
    let spec = svc.spec.as_ref();
    match spec.and_then(|s| s.session_affinity.as_deref()) {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => policy.affinity_timeout_s = DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => {
                    policy.affinity_timeout_s = t as u32
                }
                Some(t) => reject(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in \
                     1-{MAX_AFFINITY_TIMEOUT_S}; no session affinity"
                )),
            }
        }
        Some(other) => reject(format!(
            "unknown sessionAffinity {other:?}; no session affinity"
        )),
    }
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    if let Some(value) = annotation {
        match LbAlgorithm::parse(value.trim()) {
            Some(a) => policy.algorithm = Some(a),
            None => reject(format!(
                "annotation {LB_ALGORITHM_ANNOTATION}: {value:?} is not random or maglev; \
                 using the default"
            )),
        }
    }
    policy
}

/// IPv4 prefixes of spec.loadBalancerSourceRanges, host bits cleared. IPv6 ones belong to the
/// other family (kube-proxy filters per family; none left = no restriction for IPv4).
/// An invalid entry fails closed: the caller drops the LoadBalancer frontends rather than
/// open them wider than asked.
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Vec<(Ipv4Addr, u8)>, String> {
    let mut out = BTreeSet::new();
    for cidr in spec.load_balancer_source_ranges.iter().flatten() {
        let cidr = cidr.trim();
        let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
        let parsed = match (addr.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(ip)), Ok(len)) if len <= 32 => Some((ip, len)),
            (Ok(IpAddr::V6(_)), Ok(len)) if len <= 128 => continue,
            _ => None,
        };
        match parsed {
            Some((ip, len)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                out.insert((Ipv4Addr::from(u32::from(ip) & mask), len));
            }
            None => {
                return Err(format!(
                    "loadBalancerSourceRanges: invalid CIDR {cidr:?}; no LoadBalancer frontends"
                ));
            }
        }
    }
    Ok(out.into_iter().collect())
}

fn reject_all<T>(reject: &mut impl FnMut(String), reason: String) -> Option<T> {
    reject(format!("{reason}; Service skipped"));
    None
}

fn port_plan(p: &ServicePort, index: usize) -> Result<PortPlan, String> {
    let port = valid_port(p.port).ok_or_else(|| format!("port {} is not in 1-65535", p.port))?;
    let proto = match p.protocol.as_deref() {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some("SCTP") => Proto::Sctp,
        Some(other) => return Err(format!("unknown protocol {other:?} (index {index})")),
    };
    let target = match &p.target_port {
        None => Target::Number(port),
        Some(IntOrString::Int(n)) => Target::Number(
            valid_port(*n).ok_or_else(|| format!("targetPort {n} is not in 1-65535"))?,
        ),
        Some(IntOrString::String(s)) if s.is_empty() => Target::Number(port),
        // Quoted numbers are common in hand-written YAML ("8080"); treat them as numbers.
        Some(IntOrString::String(s)) => match s.parse::<i32>() {
            Ok(n) => Target::Number(
                valid_port(n).ok_or_else(|| format!("targetPort {n} is not in 1-65535"))?,
            ),
            Err(_) => Target::Named(s.clone()),
        },
    };
    // The datapath cannot rewrite SCTP ports (the CRC32c over the whole packet would change).
    if proto == Proto::Sctp && target != Target::Number(port) {
        return Err(format!(
            "SCTP needs targetPort equal to port ({port}): SCTP ports are not translated"
        ));
    }
    Ok(PortPlan {
        name: p.name.clone().unwrap_or_default(),
        port,
        proto,
        target,
        frontends: Vec::new(),
    })
}

pub(super) fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// The IPv4 addresses among `ips`; IPv6 ones are valid but not ours (the datapath is IPv4).
fn ipv4s<'s>(field: &str, ips: impl IntoIterator<Item = &'s str>) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4))
                if !(v4.is_unspecified()
                    || v4.is_loopback()
                    || v4.is_multicast()
                    || v4.is_broadcast()) =>
            {
                if !out.contains(&v4) {
                    out.push(v4);
                }
            }
            Ok(IpAddr::V6(_)) => {}
            Ok(IpAddr::V4(v4)) => return Err(format!("{field}: {v4} cannot be a Service address")),
            Err(_) => return Err(format!("{field}: invalid IP address {ip:?}")),
        }
    }
    Ok(out)
}
