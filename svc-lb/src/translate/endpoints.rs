//! The backends of a Service port: from its EndpointSlices when it has any, otherwise from the
//! Pods its selector picks (doing the EndpointSlice controller's job locally).
//!
//! Endpoint conditions follow kube-proxy (KEP-1669): a port uses its ready endpoints; only when
//! it has none does it fall back to endpoints that are serving and terminating, so a Service
//! whose pods are all shutting down keeps answering until they are gone instead of refusing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::Pod,
    discovery::v1::{Endpoint, EndpointSlice},
};
use tracing::debug;

use super::{
    Rejected,
    service::{PortPlan, ServicePlan, Target, valid_port},
};
use crate::{
    k8s::{namespace, selector},
    model::{BackendAddr, Proto},
};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Slices and Pods, pre-filtered and grouped so each Service port looks up only its own.
pub(super) struct EndpointIndex<'a> {
    /// (namespace, service name) -> its IPv4 slices.
    slices: BTreeMap<(&'a str, &'a str), Vec<Slice<'a>>>,
    /// Services with slices of any address type: those never fall back to Pods.
    has_slices: BTreeSet<(&'a str, &'a str)>,
    /// namespace -> Pods that may serve traffic.
    pods: BTreeMap<&'a str, Vec<ServingPod<'a>>>,
    /// Endpoint address -> the node it runs on, where a slice or Pod names one.
    nodes: BTreeMap<Ipv4Addr, &'a str>,
}

struct Slice<'a> {
    slice: &'a EndpointSlice,
    /// Addresses of endpoints that may serve, with their condition and node.
    endpoints: Vec<(Ipv4Addr, Serving, Option<&'a str>)>,
}

/// How an endpoint may serve traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Serving {
    /// Ready: gets new connections.
    Ready,
    /// Serving but terminating: only used when the port has no ready endpoint.
    Terminating,
}

struct ServingPod<'a> {
    pod: &'a Pod,
    ip: Ipv4Addr,
    serving: Serving,
}

/// Collects backends split by condition; the result is the ready ones, or the terminating ones
/// when there is no ready one.
#[derive(Default)]
struct Candidates {
    ready: BTreeSet<BackendAddr>,
    terminating: BTreeSet<BackendAddr>,
}

impl Candidates {
    fn insert(&mut self, b: BackendAddr, serving: Serving) {
        match serving {
            Serving::Ready => self.ready.insert(b),
            Serving::Terminating => self.terminating.insert(b),
        };
    }

    fn into_backends(self) -> Vec<BackendAddr> {
        if self.ready.is_empty() {
            self.terminating.into_iter().collect()
        } else {
            self.ready.into_iter().collect()
        }
    }
}

/// The condition of a slice endpoint, `None` when it must not get traffic at all.
fn slice_serving(e: &Endpoint) -> Option<Serving> {
    let c = e.conditions.as_ref();
    // API docs: nil `ready` means ready; nil `serving` defers to `ready`; nil `terminating`
    // means not terminating.
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        Some(Serving::Ready)
    } else if serving && terminating {
        Some(Serving::Terminating)
    } else {
        None
    }
}

impl<'a> EndpointIndex<'a> {
    /// Indexes `slices` and `pods` (for one Service: its own slices and its namespace's Pods).
    pub fn new(
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        pods: impl IntoIterator<Item = &'a Pod>,
        rejected: &mut Vec<Rejected>,
    ) -> Self {
        let mut index = EndpointIndex {
            slices: BTreeMap::new(),
            has_slices: BTreeSet::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for slice in slices {
            let labels = slice.metadata.labels.as_ref();
            let Some(svc) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
                continue;
            };
            let key = (namespace(&slice.metadata), svc.as_str());
            index.has_slices.insert(key);
            if slice.address_type != "IPv4" {
                continue;
            }
            let endpoints = slice
                .endpoints
                .iter()
                .filter_map(|e| Some((e, slice_serving(e)?)))
                // Consumers use the first address only (the API allows more for future use).
                .filter_map(|(e, serving)| {
                    Some((e.addresses.first()?, serving, e.node_name.as_deref()))
                })
                .filter_map(|(a, serving, node)| match a.parse::<Ipv4Addr>() {
                    Ok(ip) => Some((ip, serving, node)),
                    Err(_) => {
                        rejected.push(Rejected {
                            object: format!(
                                "EndpointSlice {}/{}",
                                key.0,
                                slice.metadata.name.as_deref().unwrap_or("<no name>")
                            ),
                            reason: format!("endpoint address {a:?} is not an IPv4 address"),
                        });
                        None
                    }
                })
                .collect();
            for &(ip, _, node) in &endpoints {
                if let Some(node) = node {
                    index.nodes.insert(ip, node);
                }
            }
            index
                .slices
                .entry(key)
                .or_default()
                .push(Slice { slice, endpoints });
        }
        for pod in pods {
            if let Some((ip, serving)) = serving_ip(pod) {
                if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
                    index.nodes.entry(ip).or_insert(node);
                }
                index
                    .pods
                    .entry(namespace(&pod.metadata))
                    .or_default()
                    .push(ServingPod { pod, ip, serving });
            }
        }
        index
    }

    /// Whether the endpoint at `ip` runs on a node other than `node` (unknown = local).
    pub fn is_remote(&self, ip: Ipv4Addr, node: &str) -> bool {
        self.nodes.get(&ip).is_some_and(|n| *n != node)
    }

    /// Sorted, deduplicated backends of one Service port; with `node`, only endpoints on that
    /// node (traffic policy Local; the terminating fallback then applies among those).
    pub fn backends(
        &self,
        svc: &ServicePlan<'_>,
        port: &PortPlan,
        node: Option<&str>,
    ) -> Vec<BackendAddr> {
        self.candidates(svc, port, node).into_backends()
    }

    /// The ready endpoints of one Service port on `node` only, without the terminating
    /// fallback (what kube-proxy's health check counts).
    pub fn ready_on(&self, svc: &ServicePlan<'_>, port: &PortPlan, node: &str) -> Vec<BackendAddr> {
        self.candidates(svc, port, Some(node))
            .ready
            .into_iter()
            .collect()
    }

    fn candidates(&self, svc: &ServicePlan<'_>, port: &PortPlan, node: Option<&str>) -> Candidates {
        let on_node = |n: Option<&str>| node.is_none() || n == node;
        let key = (svc.namespace, svc.name);
        let mut out = Candidates::default();
        if self.has_slices.contains(&key) {
            for s in self.slices.get(&key).into_iter().flatten() {
                let Some(target) = slice_port(s.slice, port) else {
                    continue;
                };
                // SCTP ports are never translated (see `service::port_plan`).
                if port.proto == Proto::Sctp && target != port.port {
                    debug!(
                        service = %svc.object(),
                        port = %port.label(),
                        target,
                        "SCTP endpoint port differs from the Service port; skipped"
                    );
                    continue;
                }
                for &(ip, serving, n) in &s.endpoints {
                    if on_node(n) {
                        out.insert(BackendAddr { ip, port: target }, serving);
                    }
                }
            }
        } else {
            for p in self.pods.get(svc.namespace).into_iter().flatten() {
                if !selector::selects(svc.service, p.pod) {
                    continue;
                }
                let pod_node = p.pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if !on_node(pod_node) {
                    continue;
                }
                match target_port(p.pod, port) {
                    Some(target) => out.insert(
                        BackendAddr {
                            ip: p.ip,
                            port: target,
                        },
                        p.serving,
                    ),
                    None => debug!(
                        service = %svc.object(),
                        pod = p.pod.metadata.name.as_deref().unwrap_or(""),
                        port = %port.label(),
                        "pod has no container port named like the targetPort; skipped"
                    ),
                }
            }
        }
        out
    }
}

/// The slice's port number for the Service port: same name (both may be empty) and protocol.
fn slice_port(slice: &EndpointSlice, port: &PortPlan) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| {
            p.name.as_deref().unwrap_or("") == port.name
                && proto_is(p.protocol.as_deref(), port.proto)
        })
        .and_then(|p| p.port)
        .and_then(valid_port)
}

/// The Pod's IPv4 address when it may receive traffic, as the EndpointSlice controller would
/// publish it: ready, or (deletionTimestamp set) serving and terminating. A Pod without a Ready
/// condition yet counts as ready (hand-written manifests often omit status conditions).
fn serving_ip(pod: &Pod) -> Option<(Ipv4Addr, Serving)> {
    let serving = if pod.metadata.deletion_timestamp.is_some() {
        Serving::Terminating
    } else {
        Serving::Ready
    };
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let not_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "False");
    if not_ready {
        return None;
    }
    // podIPs lists every family (the primary first); podIP is the primary only.
    let ips = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    ips.chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some((v4, serving)),
            IpAddr::V6(_) => None,
        })
}

fn target_port(pod: &Pod, port: &PortPlan) -> Option<u16> {
    match &port.target {
        Target::Number(n) => Some(*n),
        Target::Named(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| {
                cp.name.as_deref() == Some(name.as_str())
                    && proto_is(cp.protocol.as_deref(), port.proto)
            })
            .and_then(|cp| valid_port(cp.container_port)),
    }
}

fn proto_is(protocol: Option<&str>, proto: Proto) -> bool {
    match protocol.unwrap_or("TCP") {
        "TCP" => proto == Proto::Tcp,
        "UDP" => proto == Proto::Udp,
        "SCTP" => proto == Proto::Sctp,
        _ => false,
    }
}
