//! Kubernetes objects -> the dataplane's desired state, following kube-proxy's contract: which
//! Services get frontends, on which addresses, and which endpoints back them.
//!
//! Anything invalid is reported as [`Rejected`] and skipped at the smallest sensible scope (an
//! address, a port, a Service); everything else keeps working.

mod endpoints;
mod service;

use std::{fmt, net::Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use tracing::debug;

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
}

pub fn translate(objects: &Objects, cfg: &TranslateConfig) -> Translation {
    let mut out = Translation::default();
    let node_ips = service::node_addresses(objects, cfg);
    let index = endpoints::EndpointIndex::new(objects, &mut out.rejected);

    // Sorted so that the earlier Service wins a contested frontend, whatever the file order.
    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by(|a, b| {
        let key = |s: &Service| (namespace(&s.metadata).to_owned(), s.metadata.name.clone());
        key(a).cmp(&key(b))
    });

    for svc in services {
        let Some(plan) = service::plan(svc, &node_ips, cfg, &mut out.rejected) else {
            continue;
        };
        let node = cfg.node_name.as_deref();
        for port in &plan.ports {
            let backends = index.backends(&plan, port, None);
            let local_backends = (plan.external_local || plan.internal_local)
                .then(|| index.backends(&plan, port, node));
            let service_ref = ServicePortRef {
                namespace: plan.namespace.to_owned(),
                name: plan.name.to_owned(),
                port: port.label(),
            };
            for &(key, kind) in &port.frontends {
                if let Some(owner) = out.state.frontends.get(&key) {
                    out.rejected.push(Rejected {
                        object: plan.object(),
                        reason: format!(
                            "port {}: {kind} frontend {key} is already used by {} ({})",
                            port.label(),
                            owner.service,
                            owner.kind
                        ),
                    });
                    continue;
                }
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
                out.state.frontends.insert(
                    key,
                    Frontend {
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
                    },
                );
            }
        }
    }
    for r in &out.rejected {
        debug!(object = %r.object, reason = %r.reason, "rejected");
    }
    out
}

#[cfg(test)]
mod tests;
