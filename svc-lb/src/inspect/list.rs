//! The minikube-style Service list: NAMESPACE | NAME | TYPE | URL, one URL per node address and
//! node port (`http://NODE-IP:NODEPORT`), "No node port" for Services without one.
//!
//! Built from the pinned maps only. What they cannot tell: Services without frontends
//! (headless, ExternalName, or everything skipped) are absent, and a LoadBalancer Service
//! without a load-balancer address yet is indistinguishable from a NodePort one.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;
use svc_lb_common::{SCOPE_EXTERNAL, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT};

use super::{InspectError, table::Table};
use crate::{
    cli::{OutputFormat, ServiceArgs, ServiceCommand},
    maps::{BpfLbMaps, LbMaps as _, MapState, dump},
    model::Proto,
};

/// What the URL column says for a Service without node ports (minikube's wording).
pub const NO_NODE_PORT: &str = "No node port";

/// One node-port frontend of a Service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodePortUrl {
    /// The Service port's name, or its number when unnamed.
    pub port: String,
    pub protocol: String,
    pub node_ip: Ipv4Addr,
    pub node_port: u16,
    /// `http://IP:PORT` for TCP, `udp://IP:PORT` for UDP (an http URL would be a lie).
    pub url: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`, as far as the frontends tell.
    #[serde(rename = "type")]
    pub kind: String,
    /// Sorted by node port, then node address.
    pub urls: Vec<NodePortUrl>,
}

/// `namespace/name:port` → its three parts (the port label never contains ':' or '/', a
/// namespace never contains '/').
pub fn split_name(full: &str) -> Option<(&str, &str, &str)> {
    let (ns, rest) = full.split_once('/')?;
    let (name, port) = rest.rsplit_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then_some((ns, name, port))
}

pub fn url(proto: u8, ip: Ipv4Addr, port: u16) -> String {
    let scheme = match Proto::from_number(proto) {
        Some(Proto::Udp) => "udp",
        Some(Proto::Sctp) => "sctp",
        _ => "http",
    };
    format!("{scheme}://{ip}:{port}")
}

/// One row per Service with at least one named frontend, sorted by namespace and name.
pub fn rows(state: &MapState) -> Vec<ServiceRow> {
    // (namespace, name) -> (flags of all its frontends, node ports)
    let mut services: BTreeMap<(String, String), (u16, Vec<NodePortUrl>)> = BTreeMap::new();
    for (k, v) in &state.services {
        if k.backend_slot != 0 || k.scope != SCOPE_EXTERNAL {
            continue;
        }
        let Some(full) = state.names.get(&v.rev_nat_id) else {
            continue;
        };
        let Some((ns, name, port)) = split_name(full.as_str()) else {
            continue;
        };
        let entry = services.entry((ns.into(), name.into())).or_default();
        entry.0 |= v.flags;
        if v.flags & SVC_F_NODE_PORT != 0 {
            entry.1.push(NodePortUrl {
                port: port.into(),
                protocol: dump::proto_name(k.proto),
                node_ip: k.ip(),
                node_port: k.port(),
                url: url(k.proto, k.ip(), k.port()),
            });
        }
    }
    services
        .into_iter()
        .map(|((namespace, name), (flags, mut urls))| {
            urls.sort_by_key(|u| (u.node_port, u.node_ip));
            let kind = if flags & SVC_F_LOAD_BALANCER != 0 {
                "LoadBalancer"
            } else if flags & SVC_F_NODE_PORT != 0 {
                "NodePort"
            } else {
                "ClusterIP"
            };
            ServiceRow {
                namespace,
                name,
                kind: kind.into(),
                urls,
            }
        })
        .collect()
}

/// Keeps the rows of one namespace (`None` = all).
pub fn filter(rows: Vec<ServiceRow>, namespace: Option<&str>) -> Vec<ServiceRow> {
    match namespace {
        None => rows,
        Some(ns) => rows.into_iter().filter(|r| r.namespace == ns).collect(),
    }
}

/// The aligned table (continuation rows carry a Service's further URLs), or JSON.
pub fn render(rows: &[ServiceRow], format: OutputFormat) -> Result<String, serde_json::Error> {
    if format == OutputFormat::Json {
        return super::json(&rows);
    }
    let mut t = Table::new(&[
        ("NAMESPACE", false),
        ("NAME", false),
        ("TYPE", false),
        ("URL", false),
    ]);
    for r in rows {
        let mut urls = r.urls.iter().map(|u| u.url.clone());
        t.row(vec![
            r.namespace.clone(),
            r.name.clone(),
            r.kind.clone(),
            urls.next().unwrap_or_else(|| NO_NODE_PORT.into()),
        ]);
        for u in urls {
            t.row(vec![String::new(), String::new(), String::new(), u]);
        }
    }
    Ok(t.render())
}

/// `svc-lb service NAME --url`: one URL per line, like `minikube service NAME --url`.
pub fn render_urls(row: &ServiceRow) -> String {
    row.urls.iter().map(|u| format!("{}\n", u.url)).collect()
}

/// Runs `svc-lb service ...` and returns what to print.
pub fn service(args: &ServiceArgs) -> Result<String, InspectError> {
    match &args.command {
        Some(ServiceCommand::List(l)) => {
            let maps = BpfLbMaps::open(&l.common.pin.pin_dir)?;
            let rows = rows(&maps.dump()?);
            Ok(render(
                &filter(rows, l.namespaces.namespace.as_deref()),
                l.common.output,
            )?)
        }
        None => {
            let name = args.name.as_deref().ok_or(InspectError::NoName)?;
            let maps = BpfLbMaps::open(&args.pin.pin_dir)?;
            let rows = rows(&maps.dump()?);
            let namespace = args.namespace.as_str();
            let row = rows
                .into_iter()
                .find(|r| r.namespace == namespace && r.name == name)
                .ok_or_else(|| InspectError::NotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                })?;
            if args.url {
                if row.urls.is_empty() {
                    return Err(InspectError::NoNodePort {
                        namespace: namespace.into(),
                        name: name.into(),
                    });
                }
                return Ok(render_urls(&row));
            }
            let format = args.output;
            Ok(render(std::slice::from_ref(&row), format)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        maps::FakeLbMaps,
        model::{DesiredState, Frontend, FrontendKind},
        reconcile::{Limits, Reconciler},
    };

    /// A frontend of `svc` (`namespace/name:port`) with one backend.
    fn fe(ip: [u8; 4], port: u16, proto: Proto, kind: FrontendKind, svc: &str) -> Frontend {
        crate::inspect::fixtures::frontend(ip, port, proto, kind, svc, &[([10, 244, 1, 2], 80)])
    }

    /// The test topology's Services plus a two-node, two-port NodePort and a LoadBalancer,
    /// programmed through the real reconciler.
    fn state() -> MapState {
        use FrontendKind::*;
        use Proto::*;
        let frontends = [
            fe(
                [10, 96, 0, 10],
                80,
                Tcp,
                ClusterIp,
                "default/frontend-svc:http",
            ),
            fe(
                [10, 96, 0, 20],
                8080,
                Tcp,
                ClusterIp,
                "default/web-service:http",
            ),
            fe(
                [172, 31, 0, 1],
                30080,
                Tcp,
                NodePort,
                "default/web-service:http",
            ),
            fe([10, 96, 0, 53], 53, Udp, ClusterIp, "kube-system/dns:dns"),
            fe([10, 96, 1, 1], 80, Tcp, ClusterIp, "shop/cart:web"),
            fe([10, 96, 1, 1], 53, Udp, ClusterIp, "shop/cart:stats"),
            fe([192, 168, 0, 2], 31000, Tcp, NodePort, "shop/cart:web"),
            fe([192, 168, 0, 1], 31000, Tcp, NodePort, "shop/cart:web"),
            fe([192, 168, 0, 1], 31001, Udp, NodePort, "shop/cart:stats"),
            fe([10, 96, 1, 2], 443, Tcp, ClusterIp, "shop/lb:443"),
            fe([192, 168, 0, 1], 32443, Tcp, NodePort, "shop/lb:443"),
            fe([203, 0, 113, 7], 443, Tcp, LoadBalancer, "shop/lb:443"),
        ];
        let desired = DesiredState {
            frontends: frontends.into_iter().map(|f| (f.key, f)).collect(),
        };
        let mut maps = FakeLbMaps::default();
        Reconciler::new(Limits::default())
            .full(&mut maps, &desired)
            .unwrap();
        maps.state
    }

    #[test]
    fn table_like_minikube_service_list() {
        let out = render(&rows(&state()), OutputFormat::Table).unwrap();
        assert_eq!(
            out,
            "\
NAMESPACE    NAME          TYPE          URL
default      frontend-svc  ClusterIP     No node port
default      web-service   NodePort      http://172.31.0.1:30080
kube-system  dns           ClusterIP     No node port
shop         cart          NodePort      http://192.168.0.1:31000
                                         http://192.168.0.2:31000
                                         udp://192.168.0.1:31001
shop         lb            LoadBalancer  http://192.168.0.1:32443
"
        );
    }

    #[test]
    fn namespace_filter_and_json() {
        let rows = filter(rows(&state()), Some("shop"));
        assert_eq!(
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["cart", "lb"]
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(json[0]["type"], "NodePort");
        assert_eq!(json[0]["urls"][2]["port"], "stats");
        assert_eq!(json[0]["urls"][2]["protocol"], "UDP");
        assert_eq!(json[0]["urls"][0]["url"], "http://192.168.0.1:31000");
        assert_eq!(json[1]["urls"][0]["node_port"], 32443);
        assert!(filter(rows, Some("nope")).is_empty());
    }

    #[test]
    fn urls_one_per_line() {
        let rows = rows(&state());
        let cart = rows.iter().find(|r| r.name == "cart").unwrap();
        assert_eq!(
            render_urls(cart),
            "http://192.168.0.1:31000\nhttp://192.168.0.2:31000\nudp://192.168.0.1:31001\n"
        );
    }

    #[test]
    fn names_split_on_the_last_colon() {
        assert_eq!(split_name("ns/a:b"), Some(("ns", "a", "b")));
        assert_eq!(split_name("ns/web:8080"), Some(("ns", "web", "8080")));
        assert_eq!(split_name("<rev-nat 3>"), None);
        assert_eq!(split_name("/x:1"), None);
    }

    #[test]
    fn unnamed_frontends_are_left_out() {
        let mut s = state();
        s.names.clear();
        assert!(rows(&s).is_empty());
        assert_eq!(
            render(&[], OutputFormat::Table).unwrap(),
            "NAMESPACE  NAME  TYPE  URL\n"
        );
    }
}
