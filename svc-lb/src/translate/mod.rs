//! Kubernetes objects -> the dataplane's desired state, following kube-proxy's contract: which
//! Services get frontends, on which addresses, and which endpoints back them.
//!
//! Anything invalid is reported as [`Rejected`] and skipped at the smallest sensible scope (an
//! address, a port, a Service); everything else keeps working.

mod endpoints;
mod incremental;
mod service;

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use tracing::debug;

use self::endpoints::SERVICE_NAME_LABEL;
pub use self::incremental::{IncrementalTranslator, SharedObjects};

use crate::{
    cli::PortRange,
    k8s::{manifest::Objects, namespace},
    model::{DesiredState, Frontend, FrontendKind, LbPolicy, ServicePortRef},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TranslateConfig {
    /// Addresses NodePort frontends listen on (besides the Node object's, see `node_name`).
    pub node_ips: Vec<Ipv4Addr>,
    /// This node's name: InternalIP/ExternalIP addresses of the Node with this name are added
    /// to `node_ips`.
    pub node_name: Option<String>,
    pub nodeport_range: PortRange,
}

/// An object (or part of one) that was not programmed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `Kind namespace/name`, e.g. `Service default/web`.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    /// In processing order: Services sorted by namespace/name.
    pub rejected: Vec<Rejected>,
    /// Services this node answers load balancer health checks for, sorted by namespace/name.
    pub health_checks: Vec<HealthCheck>,
}

/// A Service whose load balancer probes every node (type LoadBalancer, externalTrafficPolicy
/// Local, `spec.healthCheckNodePort`): kube-proxy answers on that port with the number of
/// ready endpoints on the node, so only nodes with local endpoints get traffic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Ready (not merely serving/terminating) endpoints on this node, each address counted
    /// once over all ports, like kube-proxy's `LocalReadyEndpoints`.
    pub local_endpoints: usize,
}

/// `(namespace, name)` of a Service (name `""` when missing: such a Service is rejected).
pub type ServiceId = (String, String);

pub(crate) fn service_id(svc: &Service) -> ServiceId {
    (
        namespace(&svc.metadata).to_owned(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// The Service an EndpointSlice belongs to (by its `kubernetes.io/service-name` label).
pub(crate) fn slice_owner(slice: &EndpointSlice) -> Option<ServiceId> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((namespace(&slice.metadata).to_owned(), svc.clone()))
}

/// One Service translated on its own: every frontend it asks for, before other Services'
/// claims on the same addresses are settled (see [`assemble`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServiceFrontends {
    /// In the order the Service lists them (ports, then addresses per port): within one
    /// Service the earlier one wins a duplicated key.
    pub frontends: Vec<Frontend>,
    /// Problems with the Service itself.
    pub rejected: Vec<Rejected>,
    /// Problems with its EndpointSlices.
    pub slice_rejected: Vec<Rejected>,
    /// Its load balancer health check, if this node serves one.
    pub health_check: Option<HealthCheck>,
}

/// Translates one Service from its own EndpointSlices and its namespace's Pods. Depends on
/// nothing else but `node_ips` and `cfg`, so a change to one Service or slice re-translates
/// only that Service.
pub(crate) fn translate_service<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: impl IntoIterator<Item = &'a Pod>,
    node_ips: &[Ipv4Addr],
    cfg: &TranslateConfig,
) -> ServiceFrontends {
    let mut out = ServiceFrontends::default();
    // By name, so the result does not depend on the order objects arrived in (it matters
    // only for odd input, e.g. one address in two slices with different node names).
    let mut slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let index = endpoints::EndpointIndex::new(slices, pods, &mut out.slice_rejected);
    let Some(plan) = service::plan(svc, node_ips, cfg, &mut out.rejected) else {
        return out;
    };
    let node = cfg.node_name.as_deref();
    out.health_check = health_check(&plan, &index, node);
    for port in &plan.ports {
        let backends = index.backends(&plan, port, None);
        let local_backends =
            (plan.external_local || plan.internal_local).then(|| index.backends(&plan, port, node));
        let service_ref = ServicePortRef {
            namespace: plan.namespace.to_owned(),
            name: plan.name.to_owned(),
            port: port.label(),
        };
        for &(key, kind) in &port.frontends {
            let local_only = if kind == FrontendKind::ClusterIp {
                plan.internal_local
            } else {
                plan.external_local
            };
            let backends = match (&local_backends, local_only) {
                (Some(local), true) => local.clone(),
                _ => backends.clone(),
            };
            // Set for every kind (a backend's map entry is shared by the Service's
            // frontends); the datapath SNATs external traffic only.
            let remote_backends = node
                .map(|node| {
                    backends
                        .iter()
                        .filter(|b| index.is_remote(b.ip, node))
                        .map(|b| b.ip)
                        .collect()
                })
                .unwrap_or_default();
            out.frontends.push(Frontend {
                key,
                kind,
                service: service_ref.clone(),
                backends,
                policy: LbPolicy {
                    // kube-proxy applies them to the load balancer's IPs only.
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        plan.policy.source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                    local_only,
                    remote_backends,
                    ..plan.policy.clone()
                },
            });
            if local_only && kind != FrontendKind::ClusterIp {
                out.frontends.push(in_cluster_twin(
                    key,
                    kind,
                    &service_ref,
                    &plan,
                    &index,
                    port,
                    node,
                ));
            }
        }
    }
    out
}

/// The in-cluster twin of an externalTrafficPolicy Local frontend: every ready endpoint (like
/// kube-proxy's short-circuit to the Service's cluster chain, which ignores both traffic
/// policies), endpoints on other nodes SNATed as under policy Cluster. Source ranges are
/// checked by the datapath on the frontend itself before it switches to the twin.
fn in_cluster_twin(
    key: crate::model::FrontendKey,
    kind: FrontendKind,
    service: &ServicePortRef,
    plan: &service::ServicePlan<'_>,
    index: &endpoints::EndpointIndex<'_>,
    port: &service::PortPlan,
    node: Option<&str>,
) -> Frontend {
    let backends = index.backends(plan, port, None);
    let remote_backends = node
        .map(|node| {
            backends
                .iter()
                .filter(|b| index.is_remote(b.ip, node))
                .map(|b| b.ip)
                .collect()
        })
        .unwrap_or_default();
    Frontend {
        key: key.internal_twin(),
        kind,
        service: service.clone(),
        backends,
        policy: LbPolicy {
            source_ranges: Vec::new(),
            local_only: false,
            remote_backends,
            ..plan.policy.clone()
        },
    }
}

/// The health check of a LoadBalancer Service with externalTrafficPolicy Local (applied, so
/// `--node-name` is known) and a valid `spec.healthCheckNodePort`.
fn health_check(
    plan: &service::ServicePlan<'_>,
    index: &endpoints::EndpointIndex<'_>,
    node: Option<&str>,
) -> Option<HealthCheck> {
    let spec = plan.service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || !plan.external_local {
        return None;
    }
    let port = spec.health_check_node_port.and_then(service::valid_port)?;
    let node = node?;
    let ready: std::collections::BTreeSet<Ipv4Addr> = plan
        .ports
        .iter()
        .flat_map(|p| index.ready_on(plan, p, node))
        .map(|b| b.ip)
        .collect();
    Some(HealthCheck {
        namespace: plan.namespace.to_owned(),
        name: plan.name.to_owned(),
        port,
        local_endpoints: ready.len(),
    })
}

/// Why `loser` (of Service `object`) does not get its key: `owner` has it.
fn conflict(object: String, loser: &Frontend, owner: &Frontend) -> Rejected {
    Rejected {
        object,
        reason: format!(
            "port {}: {} frontend {} is already used by {} ({})",
            loser.service.port, loser.kind, loser.key, owner.service, owner.kind
        ),
    }
}

/// Settles contested frontends (the Service first by namespace/name wins, whatever the file
/// or event order) and lists every problem: slices first, then each Service's own problems
/// followed by its lost frontends.
fn assemble(services: &BTreeMap<ServiceId, ServiceFrontends>) -> Translation {
    let mut out = Translation::default();
    for s in services.values() {
        out.rejected.extend(s.slice_rejected.iter().cloned());
    }
    out.health_checks = services
        .values()
        .filter_map(|s| s.health_check.clone())
        .collect();
    for ((ns, name), s) in services {
        out.rejected.extend(s.rejected.iter().cloned());
        for fe in &s.frontends {
            match out.state.frontends.get(&fe.key) {
                // Its frontend's conflict is reported already.
                Some(_) if fe.key.internal => {}
                Some(owner) => out
                    .rejected
                    .push(conflict(describe_service(ns, name), fe, owner)),
                None => {
                    out.state.frontends.insert(fe.key, fe.clone());
                }
            }
        }
    }
    out
}

/// `Service ns/name` as rejections name it.
fn describe_service(ns: &str, name: &str) -> String {
    let name = if name.is_empty() { "<no name>" } else { name };
    format!("Service {ns}/{name}")
}

pub fn translate(objects: &Objects, cfg: &TranslateConfig) -> Translation {
    let node_ips = service::node_addresses(&objects.nodes, cfg);
    let mut slices: BTreeMap<ServiceId, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        if let Some(owner) = slice_owner(slice) {
            slices.entry(owner).or_default().push(slice);
        }
    }
    let mut pods: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in &objects.pods {
        pods.entry(namespace(&pod.metadata)).or_default().push(pod);
    }
    let mut services = BTreeMap::new();
    for svc in &objects.services {
        let id = service_id(svc);
        if services.contains_key(&id) {
            // The loaders never produce two objects with one name; keep the first anyway.
            continue;
        }
        let t = translate_service(
            svc,
            slices.get(&id).into_iter().flatten().copied(),
            pods.get(id.0.as_str()).into_iter().flatten().copied(),
            &node_ips,
            cfg,
        );
        services.insert(id, t);
    }
    let out = assemble(&services);
    for r in &out.rejected {
        debug!(object = %r.object, reason = %r.reason, "rejected");
    }
    out
}

#[cfg(test)]
mod tests;
