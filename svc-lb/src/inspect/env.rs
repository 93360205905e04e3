//! `svc-lb debug env -n NS --manifests DIR`: the Service environment variables kubelet injects
//! into a new container of a pod in NS, in kubelet's exact format.
//!
//! Kubelet's rules (`pkg/kubelet/envvars` and `getServiceEnvVarMap`):
//! - only Services whose `spec.clusterIP` is set and not `None` (no headless, no ExternalName);
//! - those of the pod's namespace (unless `enableServiceLinks: false`), plus `kubernetes` from
//!   the `default` namespace, always; a Service of the pod's namespace with the same name wins;
//! - per Service, with `NAME` = its name upper-cased and `-` turned into `_`:
//!   `NAME_SERVICE_HOST`, `NAME_SERVICE_PORT` (first port), `NAME_SERVICE_PORT_PORTNAME` per
//!   named port, then the Docker-link variables `NAME_PORT` (first port, `proto://host:port`)
//!   and per port `NAME_PORT_<port>_<PROTO>` with `_PROTO`, `_PORT`, `_ADDR`; IPv6 addresses
//!   are bracketed in the URLs (Go's `net.JoinHostPort`).
//!
//! Kubelet collects them into a map, so a container sees them in no particular order; they
//! are printed sorted by name, like `env | sort` in the pod.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

use super::InspectError;
use crate::{
    cli::{EnvArgs, OutputFormat},
    k8s::{manifest, namespace},
};

/// The namespace and names of kubelet's "master services".
const MASTER_NAMESPACE: &str = "default";
const MASTER_SERVICES: &[&str] = &["kubernetes"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

fn var(name: String, value: String) -> EnvVar {
    EnvVar { name, value }
}

/// kubelet's `makeEnvVariableName`.
pub fn env_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

fn cluster_ip(svc: &Service) -> Option<&str> {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
}

/// Go's `net.JoinHostPort`: brackets around hosts that contain a colon.
fn join_host_port(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// kubelet's `FromServices`: the variables of each Service, in the given order.
/// Services without a cluster IP or without ports are skipped (the API server never stores
/// the latter; kubelet would index an empty list).
pub fn from_services<'a>(services: impl IntoIterator<Item = &'a Service>) -> Vec<EnvVar> {
    let mut out = Vec::new();
    for svc in services {
        let Some(ip) = cluster_ip(svc) else { continue };
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let prefix = env_name(svc.metadata.name.as_deref().unwrap_or_default());
        out.push(var(format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
        let port_var = format!("{prefix}_SERVICE_PORT");
        out.push(var(port_var.clone(), first.port.to_string()));
        for p in ports {
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push(var(
                    format!("{port_var}_{}", env_name(n)),
                    p.port.to_string(),
                ));
            }
        }
        // Docker-link compatible variables.
        for (i, p) in ports.iter().enumerate() {
            let proto = p
                .protocol
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or("TCP");
            let lower = proto.to_lowercase();
            let url = format!("{lower}://{}", join_host_port(ip, p.port));
            if i == 0 {
                out.push(var(format!("{prefix}_PORT"), url.clone()));
            }
            let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_uppercase());
            out.push(var(pp.clone(), url));
            out.push(var(format!("{pp}_PROTO"), lower));
            out.push(var(format!("{pp}_PORT"), p.port.to_string()));
            out.push(var(format!("{pp}_ADDR"), ip.to_owned()));
        }
    }
    out
}

/// kubelet's `getServiceEnvVarMap` for a pod in `ns`: which Services a pod sees, then their
/// variables, sorted by name.
pub fn for_namespace(services: &[Service], ns: &str, service_links: bool) -> Vec<EnvVar> {
    let mut chosen: BTreeMap<&str, &Service> = BTreeMap::new();
    for svc in services {
        if cluster_ip(svc).is_none() {
            continue;
        }
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let svc_ns = namespace(&svc.metadata);
        if svc_ns == MASTER_NAMESPACE && MASTER_SERVICES.contains(&name) {
            chosen.entry(name).or_insert(svc);
        } else if svc_ns == ns && service_links {
            chosen.insert(name, svc);
        }
    }
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for v in from_services(chosen.into_values()) {
        vars.insert(v.name, v.value);
    }
    vars.into_iter()
        .map(|(name, value)| var(name, value))
        .collect()
}

pub fn render(vars: &[EnvVar], format: OutputFormat) -> Result<String, serde_json::Error> {
    if format == OutputFormat::Json {
        let obj: serde_json::Map<String, serde_json::Value> = vars
            .iter()
            .map(|v| (v.name.clone(), v.value.clone().into()))
            .collect();
        return super::json(&obj);
    }
    Ok(vars
        .iter()
        .map(|v| format!("{}={}\n", v.name, v.value))
        .collect())
}

/// Reads the Services (manifests or API server) and renders what a pod in the namespace gets.
pub fn run(args: &EnvArgs) -> Result<String, InspectError> {
    let services = match &args.manifests {
        Some(dir) => load_services(dir)?,
        None => list_services(args.kubeconfig.as_deref(), args.context.as_deref())?,
    };
    let vars = for_namespace(&services, &args.namespace, !args.no_service_links);
    Ok(render(&vars, args.output)?)
}

/// Every Service of the cluster, like kubelet's lister (it needs `kubernetes` from `default`
/// besides the pod's namespace).
fn list_services(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<Vec<Service>, InspectError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(InspectError::Runtime)?;
    rt.block_on(async {
        let (client, _) = crate::k8s::client::client(kubeconfig, context).await?;
        let list = kube::Api::<Service>::all(client)
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| InspectError::Api(Box::new(e)))?;
        Ok(list.items)
    })
}

/// Problems with single files are logged and the rest is used (like the agent does).
fn load_services(dir: &Path) -> Result<Vec<Service>, InspectError> {
    let (objects, errors) = manifest::load_dir(dir)?;
    for e in errors {
        tracing::warn!("manifest: {e}");
    }
    Ok(objects.services)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(yaml: &str) -> Vec<Service> {
        yaml.split("\n---\n")
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect()
    }

    fn text(vars: &[EnvVar]) -> String {
        render(vars, OutputFormat::Table).unwrap()
    }

    /// The example of the Kubernetes documentation (Service concept page, "Environment
    /// variables"): redis-primary, TCP 6379, cluster IP 10.0.0.11.
    #[test]
    fn kubernetes_docs_example() {
        let svcs = services(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: redis-primary\nspec:\n  clusterIP: 10.0.0.11\n  ports:\n  - port: 6379\n",
        );
        assert_eq!(
            text(&for_namespace(&svcs, "default", true)),
            "\
REDIS_PRIMARY_PORT=tcp://10.0.0.11:6379
REDIS_PRIMARY_PORT_6379_TCP=tcp://10.0.0.11:6379
REDIS_PRIMARY_PORT_6379_TCP_ADDR=10.0.0.11
REDIS_PRIMARY_PORT_6379_TCP_PORT=6379
REDIS_PRIMARY_PORT_6379_TCP_PROTO=tcp
REDIS_PRIMARY_SERVICE_HOST=10.0.0.11
REDIS_PRIMARY_SERVICE_PORT=6379
"
        );
    }

    /// redis-master at 172.17.0.6:6379 (the guestbook example's values), in kubelet's own
    /// order (FromServices), before the map makes the order arbitrary.
    #[test]
    fn redis_master_in_kubelet_order() {
        let svcs = services(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: redis-master\n  namespace: default\nspec:\n  clusterIP: 172.17.0.6\n  ports:\n  - port: 6379\n    targetPort: 6379\n    protocol: TCP\n",
        );
        let names: Vec<String> = from_services(&svcs)
            .into_iter()
            .map(|v| format!("{}={}", v.name, v.value))
            .collect();
        assert_eq!(
            names,
            [
                "REDIS_MASTER_SERVICE_HOST=172.17.0.6",
                "REDIS_MASTER_SERVICE_PORT=6379",
                "REDIS_MASTER_PORT=tcp://172.17.0.6:6379",
                "REDIS_MASTER_PORT_6379_TCP=tcp://172.17.0.6:6379",
                "REDIS_MASTER_PORT_6379_TCP_PROTO=tcp",
                "REDIS_MASTER_PORT_6379_TCP_PORT=6379",
                "REDIS_MASTER_PORT_6379_TCP_ADDR=172.17.0.6",
            ]
        );
    }

    #[test]
    fn named_ports_udp_ipv6_and_which_services() {
        let svcs = services(
            "\
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: kube-system}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: kube-system}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: v6-only, namespace: kube-system}
spec: {clusterIP: 'fd00::a', ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: other}
spec: {clusterIP: 10.96.9.9, ports: [{port: 80}]}
",
        );
        assert_eq!(
            text(&for_namespace(&svcs, "kube-system", true)),
            "\
KUBERNETES_PORT=tcp://10.96.0.1:443
KUBERNETES_PORT_443_TCP=tcp://10.96.0.1:443
KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1
KUBERNETES_PORT_443_TCP_PORT=443
KUBERNETES_PORT_443_TCP_PROTO=tcp
KUBERNETES_SERVICE_HOST=10.96.0.1
KUBERNETES_SERVICE_PORT=443
KUBERNETES_SERVICE_PORT_HTTPS=443
KUBE_DNS_PORT=udp://10.96.0.10:53
KUBE_DNS_PORT_53_TCP=tcp://10.96.0.10:53
KUBE_DNS_PORT_53_TCP_ADDR=10.96.0.10
KUBE_DNS_PORT_53_TCP_PORT=53
KUBE_DNS_PORT_53_TCP_PROTO=tcp
KUBE_DNS_PORT_53_UDP=udp://10.96.0.10:53
KUBE_DNS_PORT_53_UDP_ADDR=10.96.0.10
KUBE_DNS_PORT_53_UDP_PORT=53
KUBE_DNS_PORT_53_UDP_PROTO=udp
KUBE_DNS_SERVICE_HOST=10.96.0.10
KUBE_DNS_SERVICE_PORT=53
KUBE_DNS_SERVICE_PORT_DNS=53
KUBE_DNS_SERVICE_PORT_DNS_TCP=53
V6_ONLY_PORT=tcp://[fd00::a]:8080
V6_ONLY_PORT_8080_TCP=tcp://[fd00::a]:8080
V6_ONLY_PORT_8080_TCP_ADDR=fd00::a
V6_ONLY_PORT_8080_TCP_PORT=8080
V6_ONLY_PORT_8080_TCP_PROTO=tcp
V6_ONLY_SERVICE_HOST=fd00::a
V6_ONLY_SERVICE_PORT=8080
"
        );
        // enableServiceLinks: false keeps only the master service.
        let only_master = for_namespace(&svcs, "kube-system", false);
        assert!(
            only_master
                .iter()
                .all(|v| v.name.starts_with("KUBERNETES_"))
        );
        assert_eq!(only_master.len(), 8);
        // A Service named kubernetes in the pod's namespace wins over the master one.
        let mut local = svcs.clone();
        local.push(
            services(
                "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: other}\nspec: {clusterIP: 10.1.1.1, ports: [{port: 6443}]}\n",
            )
            .remove(0),
        );
        let vars = for_namespace(&local, "other", true);
        assert!(vars.contains(&var("KUBERNETES_SERVICE_HOST".into(), "10.1.1.1".into())));
        assert!(vars.contains(&var("WEB_SERVICE_HOST".into(), "10.96.9.9".into())));
        let json: serde_json::Value =
            serde_json::from_str(&render(&vars, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(json["WEB_PORT"], "tcp://10.96.9.9:80");
    }
}
