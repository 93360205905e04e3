//! Kubernetes objects as the API server serves them (JSON, with the fields defaulting and the
//! controllers fill in: clusterIPs, ipFamilies, managedFields, EndpointSlice conditions, owner
//! references...), for the fake API server.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::manifests::Port;

/// An endpoint of an EndpointSlice, with its KEP-1672 conditions.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub pod: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: impl Into<IpAddr>, pod: &str) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            pod: pod.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod being deleted that still serves (ready=false, serving=true, terminating=true).
    pub fn terminating(ip: impl Into<IpAddr>, pod: &str) -> Endpoint {
        Endpoint {
            ready: false,
            terminating: true,
            ..Endpoint::ready(ip, pod)
        }
    }

    /// A pod whose readiness probe fails.
    pub fn not_ready(ip: impl Into<IpAddr>, pod: &str) -> Endpoint {
        Endpoint {
            ready: false,
            serving: false,
            ..Endpoint::ready(ip, pod)
        }
    }
}

fn managed_fields(manager: &str, api_version: &str) -> Value {
    json!([{
        "manager": manager, "operation": "Update", "apiVersion": api_version,
        "time": "2026-11-25T14:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}
    }])
}

fn service_ports(ports: &[Port]) -> Vec<Value> {
    ports
        .iter()
        .map(|p| {
            let mut v = json!({
                "name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target_port
            });
            if let Some(np) = p.node_port {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect()
}

/// A Service after defaulting. `cluster_ips` holds one address per family (two = dual-stack);
/// `["None"]` makes it headless. Any `node_port` makes it `type: NodePort`.
pub fn service(name: &str, cluster_ips: &[&str], selector: (&str, &str), ports: &[Port]) -> Value {
    let node_port = ports.iter().any(|p| p.node_port.is_some());
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let families = if cluster_ips == ["None"] {
        vec!["IPv4"]
    } else {
        families
    };
    let mut spec = json!({
        "ports": service_ports(ports),
        "selector": {selector.0: selector.1},
        "clusterIP": cluster_ips[0],
        "clusterIPs": cluster_ips,
        "type": if node_port { "NodePort" } else { "ClusterIP" },
        "sessionAffinity": "None",
        "ipFamilies": families,
        "ipFamilyPolicy": if cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" },
        "internalTrafficPolicy": "Cluster",
    });
    if node_port {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"app.kubernetes.io/name": name},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n"
            },
            "managedFields": managed_fields("kubectl-client-side-apply", "v1"),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

/// Adds a label to an object's metadata.
pub fn with_label(mut obj: Value, key: &str, value: &str) -> Value {
    obj["metadata"]["labels"][key] = json!(value);
    obj
}

/// An EndpointSlice as the EndpointSlice controller writes it for `service` (slice `name`).
pub fn endpoint_slice(
    service: &str,
    name: &str,
    address_type: &str,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": "node-1",
                "zone": "zone-a",
                "targetRef": {
                    "kind": "Pod", "namespace": "default", "name": e.pod,
                    "uid": format!("0b5e4c1d-0000-4000-8000-{:012x}", e.pod.len())
                }
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.target_port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app.kubernetes.io/name": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-25T14:00:00Z"},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": service,
                "uid": "2c8e6a77-0000-4000-8000-000000000001",
                "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": managed_fields("kube-controller-manager", "discovery.k8s.io/v1"),
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A Node with an InternalIP (and its hostname), as the kubelet reports it.
pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "node-role.kubernetes.io/control-plane": ""
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": managed_fields("kubelet", "v1"),
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2026-11-25T14:00:00Z", "lastTransitionTime": "2026-11-25T13:00:00Z"
            }],
            "nodeInfo": {
                "machineID": "0", "systemUUID": "0", "bootID": "0", "kernelVersion": "6.18.0",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": "v1.34.0", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64"
            }
        }
    })
}
