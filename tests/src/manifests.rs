//! Kubernetes manifests for tests, written as the API server would serve them (Service,
//! EndpointSlice, Pod), into a directory the agent watches.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::netns::Pod;

pub const FRONTEND_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const WEB_NODE_PORT: u16 = 30080;
pub const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl Port {
    pub const fn tcp(name: &'static str, port: u16, target_port: u16) -> Port {
        Port {
            name,
            protocol: "TCP",
            port,
            target_port,
            node_port: None,
        }
    }
    pub const fn udp(name: &'static str, port: u16, target_port: u16) -> Port {
        Port {
            protocol: "UDP",
            ..Port::tcp(name, port, target_port)
        }
    }
}

/// A Service. `node_port` on any port makes it `type: NodePort`.
pub fn service(name: &str, cluster_ip: Ipv4Addr, selector: (&str, &str), ports: &[Port]) -> String {
    let kind = if ports.iter().any(|p| p.node_port.is_some()) {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs:\n  - {cluster_ip}\n\
         \x20 ipFamilies:\n  - IPv4\n  ipFamilyPolicy: SingleStack\n  sessionAffinity: None\n\
         \x20 selector:\n    {}: {}\n  ports:\n",
        selector.0, selector.1
    );
    for p in ports {
        let _ = write!(
            s,
            "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
            p.name, p.protocol, p.port, p.target_port
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(s, "    nodePort: {np}");
        }
    }
    s
}

/// The EndpointSlice the endpointslice controller would write for `service` with `pods` ready.
pub fn endpoint_slice(service: &str, ports: &[Port], pods: &[&Pod]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x7k2p\n\
         \x20 namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\n\
         \x20   endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
         addressType: IPv4\nports:\n"
    );
    for p in ports {
        let _ = write!(
            s,
            "- name: {}\n  protocol: {}\n  port: {}\n",
            p.name, p.protocol, p.target_port
        );
    }
    if pods.is_empty() {
        s.push_str("endpoints: []\n");
    } else {
        s.push_str("endpoints:\n");
    }
    for pod in pods {
        let _ = write!(
            s,
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n\
             \x20 nodeName: node-1\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: default\n",
            pod.ip, pod.name
        );
    }
    s
}

/// A running, ready Pod carrying the labels of every standard Service.
pub fn pod(pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n\
         \x20   app: frontend\n    k8s-app: webserver\n    dns: resolver\nspec:\n  nodeName: node-1\n\
         \x20 containers:\n  - name: echo\n    image: svc-lb-echo\nstatus:\n  phase: Running\n\
         \x20 podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
        name = pod.name,
        ip = pod.ip
    )
}

pub const FRONTEND_PORTS: [Port; 1] = [Port::tcp("http", 80, 5000)];
pub const WEB_PORTS: [Port; 1] = [Port {
    node_port: Some(WEB_NODE_PORT),
    ..Port::tcp("http", 8080, 80)
}];
pub const DNS_PORTS: [Port; 1] = [Port::udp("dns", 53, 5353)];

/// The three Services of `notes/common.md`, all backed by `pods`.
pub fn standard(pods: &[&Pod]) -> String {
    let docs = [
        service(
            "frontend-svc",
            FRONTEND_VIP,
            ("app", "frontend"),
            &FRONTEND_PORTS,
        ),
        endpoint_slice("frontend-svc", &FRONTEND_PORTS, pods),
        service("web-service", WEB_VIP, ("k8s-app", "webserver"), &WEB_PORTS),
        endpoint_slice("web-service", &WEB_PORTS, pods),
        service("dns", DNS_VIP, ("dns", "resolver"), &DNS_PORTS),
        endpoint_slice("dns", &DNS_PORTS, pods),
    ];
    join(&docs)
}

/// Pod objects for `pods`.
pub fn pods(pods: &[&Pod]) -> String {
    join(&pods.iter().map(|p| pod(p)).collect::<Vec<_>>())
}

pub fn join(docs: &[String]) -> String {
    docs.join("---\n")
}

/// A manifests directory; files are replaced atomically (write elsewhere, then rename), so the
/// agent never reads a half-written file.
pub struct ManifestDir {
    pub path: PathBuf,
    staging: PathBuf,
}

impl ManifestDir {
    /// Creates `<parent>/manifests` (and a staging dir next to it, outside the watched one).
    pub fn new(parent: &Path) -> ManifestDir {
        let path = parent.join("manifests");
        let staging = parent.join("manifests-staging");
        for d in [&path, &staging] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        ManifestDir { path, staging }
    }

    pub fn write(&self, file: &str, content: &str) {
        let tmp = self.staging.join(file);
        fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        let dst = self.path.join(file);
        fs::rename(&tmp, &dst).unwrap_or_else(|e| panic!("rename to {}: {e}", dst.display()));
    }
}
