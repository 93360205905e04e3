//! Translation of real-looking manifests (svc-lb/tests/data, examples/) and of focused inline
//! cases. Frontends are compared as one line each so a failure shows the whole picture.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::*;
use crate::{
    cli::PortRange,
    k8s::manifest::Loader,
    model::{FrontendKey, LbAlgorithm, Proto},
};

fn data(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(dir)
}

fn load(dir: &Path) -> Objects {
    let loaded = Loader::load_dir(dir).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.objects
}

fn load_yaml(yaml: &str) -> Objects {
    let mut loader = Loader::default();
    loader.load_text(Path::new("inline.yaml"), yaml);
    assert!(loader.errors.is_empty(), "{:?}", loader.errors);
    loader.objects
}

fn cfg(node_ips: &[Ipv4Addr], node_name: Option<&str>) -> TranslateConfig {
    TranslateConfig {
        node_ips: node_ips.to_vec(),
        node_name: node_name.map(str::to_owned),
        nodeport_range: PortRange::default(),
    }
}

/// `key kind ns/name:port -> backend,backend` per frontend, in key order.
fn lines(t: &Translation) -> Vec<String> {
    t.state
        .frontends
        .iter()
        .map(|(key, f)| {
            assert_eq!(*key, f.key);
            assert!(
                f.backends.windows(2).all(|w| w[0] < w[1]),
                "unsorted: {f:?}"
            );
            let backends: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
            format!(
                "{} {} {} -> {}",
                f.key,
                f.kind,
                f.service,
                backends.join(",")
            )
        })
        .collect()
}

fn rejected(t: &Translation) -> Vec<String> {
    t.rejected.iter().map(ToString::to_string).collect()
}

#[test]
fn examples_translate_to_the_demo_frontends() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let t = translate(&load(&dir), &cfg(&[], Some("node-1")));
    let pods = |port: u16| format!("10.244.1.2:{port},10.244.2.2:{port},10.244.3.2:{port}");
    assert_eq!(
        lines(&t),
        [
            format!(
                "10.96.0.10:80/TCP ClusterIP default/frontend-svc:http -> {}",
                pods(5000)
            ),
            format!(
                "10.96.0.20:8080/TCP ClusterIP default/web-service:web -> {}",
                pods(80)
            ),
            format!(
                "10.96.0.53:53/UDP ClusterIP default/dns-echo:dns -> {}",
                pods(5353)
            ),
            format!(
                "172.31.0.1:30080/TCP NodePort default/web-service:web -> {}",
                pods(80)
            ),
        ]
    );
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    // The flags the datapath gets follow the kind.
    let np = &t.state.frontends[&FrontendKey {
        ip: Ipv4Addr::new(172, 31, 0, 1),
        port: 30080,
        proto: Proto::Tcp,
        internal: false,
    }];
    assert_eq!(np.kind.flag(), svc_lb_common::SVC_F_NODE_PORT);
}

#[test]
fn examples_without_node_name_use_node_ips_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let t = translate(&load(&dir), &cfg(&[Ipv4Addr::new(10, 0, 0, 9)], None));
    let node_ports: Vec<String> = lines(&t)
        .into_iter()
        .filter(|l| l.contains("NodePort"))
        .collect();
    assert_eq!(node_ports.len(), 1);
    assert!(
        node_ports[0].starts_with("10.0.0.9:30080/TCP NodePort"),
        "{node_ports:?}"
    );
}

#[test]
fn every_service_kind_and_endpoint_source() {
    let t = translate(
        &load(&data("services")),
        &cfg(&[Ipv4Addr::new(192, 0, 2, 50)], Some("node-1")),
    );
    // web-1 and web-2 (dual-stack, IPv6 primary, no Ready condition yet) resolve the named
    // targetPort `web` to their own numbers; web-7 has no port of that name and web-8 has it
    // only for UDP. Not ready (web-3), terminating (web-4: a fallback only, and ready pods
    // exist), Succeeded (web-5), no IP (web-6),
    // other namespace (web-9) and other labels (db-0) never count.
    let web = "10.244.1.10:8080,10.244.2.10:8088";
    let all = |p: u16| format!("10.244.1.10:{p},10.244.2.10:{p},10.244.7.10:{p},10.244.8.20:{p}");
    assert_eq!(
        lines(&t),
        [
            format!("10.96.1.1:80/TCP ClusterIP demo/web:http -> {web}"),
            format!("10.96.1.1:81/TCP ClusterIP demo/web:admin -> {}", all(8081)),
            format!("10.96.2.2:443/TCP ClusterIP demo/lb:https -> {}", all(8443)),
            format!("10.96.3.3:53/UDP ClusterIP demo/ext:53 -> {}", all(5353)),
            format!(
                "10.96.4.4:8080/TCP ClusterIP demo/dual:8080 -> {}",
                all(8080)
            ),
            format!(
                "10.96.5.5:9000/TCP ClusterIP demo/mixed:tcp -> {}",
                all(9000)
            ),
            format!(
                "10.96.5.5:9001/SCTP ClusterIP demo/mixed:sctp -> {}",
                all(9001)
            ),
            // From the hand-written EndpointSlice: only the ready endpoint.
            "10.96.6.6:3306/TCP ClusterIP demo/manual:mysql -> 192.168.50.10:3306".into(),
            // No selector, no slice: the frontend exists and refuses connections.
            "10.96.7.7:80/TCP ClusterIP demo/noslice:80 -> ".into(),
            // node-1's InternalIP (its IPv6 one and the Hostname are ignored).
            format!("172.31.0.1:30080/TCP NodePort demo/web:http -> {web}"),
            format!(
                "172.31.0.1:31443/TCP NodePort demo/lb:https -> {}",
                all(8443)
            ),
            // node-1's ExternalIP.
            format!("192.0.2.1:30080/TCP NodePort demo/web:http -> {web}"),
            format!(
                "192.0.2.1:31443/TCP NodePort demo/lb:https -> {}",
                all(8443)
            ),
            // --node-ip.
            format!("192.0.2.50:30080/TCP NodePort demo/web:http -> {web}"),
            format!(
                "192.0.2.50:31443/TCP NodePort demo/lb:https -> {}",
                all(8443)
            ),
            format!(
                "198.51.100.7:53/UDP ExternalIP demo/ext:53 -> {}",
                all(5353)
            ),
            // Only the VIP-mode IPv4 ingress (not the hostname, the Proxy-mode or IPv6 one).
            format!(
                "203.0.113.10:443/TCP LoadBalancer demo/lb:https -> {}",
                all(8443)
            ),
        ]
    );
    // ExternalName `db-alias`, headless `db` and IPv6-only `v6only` give nothing, silently.
    assert_eq!(
        rejected(&t),
        [
            "Service demo/web: port admin: nodePort 40000 is outside the node port range \
             30000-32767; no NodePort frontend",
        ]
    );
}

#[test]
fn endpoint_slices_win_over_selectors() {
    let t = translate(&load(&data("kubectl-list")), &cfg(&[], None));
    // cart's slice: ready (10.244.1.5) and nil-ready (10.244.4.5) endpoints; the not-ready
    // terminating one, the not-ready one, the IPv6 slice and the pod the selector would also
    // pick (10.244.1.9) are not used. Ports come from the slice, matched by name.
    assert_eq!(
        lines(&t),
        [
            "10.96.0.1:443/TCP ClusterIP default/kubernetes:https -> 172.31.0.100:6443",
            "10.96.40.12:80/TCP ClusterIP shop/cart:http -> 10.244.1.5:8080,10.244.4.5:8080",
            "10.96.40.12:9090/TCP ClusterIP shop/cart:metrics -> 10.244.1.5:9090,10.244.4.5:9090",
        ]
    );
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
}

#[test]
fn invalid_services_are_rejected_and_the_rest_works() {
    let t = translate(
        &load(&data("invalid")),
        &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None),
    );
    assert_eq!(
        rejected(&t),
        [
            "EndpointSlice bad/a-first-1: endpoint address \"10.0.0.300\" is not an IPv4 address",
            "Service bad/<no name>: metadata.name is missing",
            "Service bad/b-conflict: port http: ClusterIP frontend 10.96.9.1:80/TCP is already \
             used by bad/a-first:http (ClusterIP)",
            "Service bad/c-bad-ip: spec.clusterIPs: invalid IP address \"10.96.999.1\"; Service skipped",
            "Service bad/d-ports: port zero: port 0 is not in 1-65535",
            "Service bad/d-ports: port huge: port 70000 is not in 1-65535",
            "Service bad/d-ports: port bad-target: targetPort 0 is not in 1-65535",
            "Service bad/e-dup: port b: 80/TCP is already defined by port a",
            "Service bad/g-bad-external: spec.externalIPs: invalid IP address \"not-an-ip\"; \
             Service skipped",
            "Service bad/h-nodeport-unset: port 80: type NodePort without spec.ports[].nodePort \
             (none was allocated); no NodePort frontend",
            "Service bad/j-loopback: spec.externalIPs: 127.0.0.1 cannot be a Service address; \
             Service skipped",
        ]
    );
    assert_eq!(
        lines(&t),
        [
            "10.96.9.1:80/TCP ClusterIP bad/a-first:http -> 10.0.0.3:8080",
            "10.96.9.1:81/TCP ClusterIP bad/b-conflict:alt -> ",
            "10.96.9.4:8080/TCP ClusterIP bad/d-ports:ok -> ",
            "10.96.9.5:80/TCP ClusterIP bad/e-dup:a -> ",
            "10.96.9.5:80/UDP ClusterIP bad/e-dup:c -> ",
            "10.96.9.8:80/TCP ClusterIP bad/h-nodeport-unset:80 -> ",
        ]
    );
}

#[test]
fn the_earlier_service_keeps_a_contested_frontend_whatever_the_file_order() {
    let a = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\n\
             spec: {clusterIP: 10.96.0.5, externalIPs: [10.0.0.1], ports: [{port: 80}]}\n";
    let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\n\
             spec: {clusterIP: 10.96.0.6, externalIPs: [10.0.0.1], ports: [{port: 80}]}\n";
    let ab = translate(&load_yaml(&format!("{a}---\n{b}")), &cfg(&[], None));
    let ba = translate(&load_yaml(&format!("{b}---\n{a}")), &cfg(&[], None));
    assert_eq!(ab, ba);
    assert_eq!(
        lines(&ab),
        [
            "10.0.0.1:80/TCP ExternalIP x/a:80 -> ",
            "10.96.0.5:80/TCP ClusterIP x/a:80 -> ",
            "10.96.0.6:80/TCP ClusterIP x/b:80 -> ",
        ]
    );
    assert_eq!(
        rejected(&ab),
        [
            "Service x/b: port 80: ExternalIP frontend 10.0.0.1:80/TCP is already used by x/a:80 (ExternalIP)"
        ]
    );
}

#[test]
fn a_nodeport_on_a_node_ip_that_is_also_an_external_ip_is_reported() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n\
                spec: {type: NodePort, clusterIP: 10.96.0.5, externalIPs: [172.31.0.1],\n\
                ports: [{port: 30001, nodePort: 30001}]}\n";
    let t = translate(
        &load_yaml(yaml),
        &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None),
    );
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:30001/TCP ClusterIP default/s:30001 -> ",
            "172.31.0.1:30001/TCP NodePort default/s:30001 -> ",
        ]
    );
    assert_eq!(t.rejected.len(), 1, "{:?}", t.rejected);
}

#[test]
fn target_ports_numbers_names_and_defaults() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: n}
spec:
  clusterIP: 10.96.0.5
  selector: {app: a}
  ports:
    - {name: absent, port: 80}
    - {name: quoted, port: 81, targetPort: "8081"}
    - {name: named, port: 82, targetPort: api}
    - {name: udp, port: 82, protocol: UDP, targetPort: api}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: n, labels: {app: a}}
spec:
  containers:
    - name: side
      image: x
      ports: [{name: api, containerPort: 9000, protocol: UDP}]
    - name: main
      image: x
      ports: [{name: api, containerPort: 9001}]
status: {phase: Running, podIP: 10.244.0.7}
"#;
    let t = translate(&load_yaml(yaml), &cfg(&[], None));
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:80/TCP ClusterIP n/s:absent -> 10.244.0.7:80",
            "10.96.0.5:81/TCP ClusterIP n/s:quoted -> 10.244.0.7:8081",
            // Same name, the protocol picks the container port.
            "10.96.0.5:82/TCP ClusterIP n/s:named -> 10.244.0.7:9001",
            "10.96.0.5:82/UDP ClusterIP n/s:udp -> 10.244.0.7:9000",
        ]
    );
}

#[test]
fn slice_ports_match_by_name_and_protocol() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.5
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports:
  - {name: dns, port: 5353, protocol: UDP}
  - {name: dns-tcp, port: 5354, protocol: TCP}
  - {name: dns-tcp, port: 5999, protocol: UDP}
endpoints:
  - addresses: [10.244.0.9]
    conditions: {ready: true, serving: true, terminating: false}
  - addresses: [10.244.0.8]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-2, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports:
  - {name: dns, port: 5353, protocol: UDP}
endpoints:
  - addresses: [10.244.0.3]
  - addresses: [10.244.0.9]
---
# Another namespace's slice for a Service of the same name.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, namespace: other, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.0.100]}]
"#;
    let t = translate(&load_yaml(yaml), &cfg(&[], None));
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:53/TCP ClusterIP default/s:dns-tcp -> 10.244.0.9:5354",
            // Two slices, deduplicated and sorted.
            "10.96.0.5:53/UDP ClusterIP default/s:dns -> 10.244.0.3:5353,10.244.0.9:5353",
        ]
    );
}

#[test]
fn custom_nodeport_range_and_lb_without_node_ports() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.5
  ports: [{port: 80, nodePort: 30500}]
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.6
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.5}]
"#;
    let mut c = cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None);
    c.nodeport_range = PortRange {
        min: 30000,
        max: 30100,
    };
    let t = translate(&load_yaml(yaml), &c);
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:80/TCP ClusterIP default/np:80 -> ",
            "10.96.0.6:80/TCP ClusterIP default/lb:80 -> ",
            "203.0.113.5:80/TCP LoadBalancer default/lb:80 -> ",
        ]
    );
    assert_eq!(
        rejected(&t),
        [
            "Service default/np: port 80: nodePort 30500 is outside the node port range \
          30000-30100; no NodePort frontend"
        ]
    );
}

#[test]
fn load_balancer_ingress_is_ignored_for_other_types() {
    // A status left over after switching the type back to ClusterIP programs nothing.
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n\
                spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n\
                status: {loadBalancer: {ingress: [{ip: 203.0.113.5}]}}\n";
    let t = translate(&load_yaml(yaml), &cfg(&[], None));
    assert_eq!(lines(&t), ["10.96.0.5:80/TCP ClusterIP default/s:80 -> "]);
}

#[test]
fn unknown_service_type_is_rejected() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n\
                spec: {type: Nodeport, clusterIP: 10.96.0.5, ports: [{port: 80}]}\n";
    let t = translate(&load_yaml(yaml), &cfg(&[], None));
    assert!(t.state.frontends.is_empty());
    assert_eq!(
        rejected(&t),
        ["Service default/s: unknown spec.type \"Nodeport\""]
    );
}

#[test]
fn port_names_must_be_unique() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.5
  ports:
    - {port: 80}
    - {port: 81}
    - {name: a, port: 82}
    - {name: a, port: 83}
"#;
    let t = translate(&load_yaml(yaml), &cfg(&[], None));
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:80/TCP ClusterIP default/s:80 -> ",
            "10.96.0.5:82/TCP ClusterIP default/s:a -> ",
        ]
    );
    assert_eq!(
        rejected(&t),
        [
            "Service default/s: port 81: ports of a multi-port Service must be named",
            "Service default/s: port a: duplicate port name",
        ]
    );
}

#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let slice = |svc: &str, eps: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: IPv4\nports: [{{name: '', port: 8080}}]\nendpoints:\n{eps}"
        )
    };
    let svc = |name: &str, ip: &str, selector: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {ip}, selector: {{app: {selector}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        )
    };
    let pod = |name: &str, app: &str, ip: &str, ready: &str, deleting: bool| {
        let deletion = if deleting {
            ", deletionTimestamp: '2026-11-25T09:00:00Z'"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}{deletion}}}\n\
             spec: {{containers: [{{name: c, image: x}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: '{ready}'}}]}}\n"
        )
    };
    let docs = [
        // Slices, one ready endpoint: the terminating ones are not used.
        svc("mixed", "10.96.0.1", "none"),
        slice(
            "mixed",
            "- {addresses: [10.0.0.1], conditions: {ready: true, serving: true, terminating: false}}\n\
             - {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}\n",
        ),
        // Slices, nothing ready: serving+terminating only (not the terminating non-serving one,
        // nor the not-ready one whose nil `serving` defers to `ready`).
        svc("draining", "10.96.0.2", "none"),
        slice(
            "draining",
            "- {addresses: [10.0.1.1], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.1.2], conditions: {ready: false, serving: false, terminating: true}}\n\
             - {addresses: [10.0.1.3], conditions: {ready: false}}\n\
             - {addresses: [10.0.1.4], conditions: {ready: false, serving: true, terminating: true}}\n",
        ),
        // Slices, nothing serving: no backends, the frontend rejects.
        svc("gone", "10.96.0.3", "none"),
        slice(
            "gone",
            "- {addresses: [10.0.2.1], conditions: {ready: false, serving: false, terminating: true}}\n",
        ),
        // Pods: a ready pod wins over a deleting one that is still Ready.
        svc("pods-mixed", "10.96.0.4", "a"),
        pod("a1", "a", "10.0.3.1", "True", false),
        pod("a2", "a", "10.0.3.2", "True", true),
        // Pods: only deleting ones; the still-Ready one serves, the not-Ready one does not.
        svc("pods-draining", "10.96.0.5", "b"),
        pod("b1", "b", "10.0.4.1", "True", true),
        pod("b2", "b", "10.0.4.2", "False", true),
        pod("b3", "b", "10.0.4.3", "False", false),
    ];
    let t = translate(&load_yaml(&docs.join("---\n")), &cfg(&[], None));
    assert_eq!(
        lines(&t),
        [
            "10.96.0.1:80/TCP ClusterIP default/mixed:80 -> 10.0.0.1:8080",
            "10.96.0.2:80/TCP ClusterIP default/draining:80 -> 10.0.1.1:8080,10.0.1.4:8080",
            "10.96.0.3:80/TCP ClusterIP default/gone:80 -> ",
            "10.96.0.4:80/TCP ClusterIP default/pods-mixed:80 -> 10.0.3.1:8080",
            "10.96.0.5:80/TCP ClusterIP default/pods-draining:80 -> 10.0.4.1:8080",
        ]
    );
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
}

#[test]
fn session_affinity_and_lb_algorithm_annotation() {
    let svc = |name: &str, ip: &str, extra_spec: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{annotations}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]{extra_spec}}}\n"
        )
    };
    let docs = [
        svc("none", "10.96.0.1", ", sessionAffinity: None", ""),
        svc("default", "10.96.0.2", ", sessionAffinity: ClientIP", ""),
        svc(
            "custom",
            "10.96.0.3",
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            ", annotations: {svc-lb.io/lb-algorithm: maglev}",
        ),
        svc(
            "bad",
            "10.96.0.4",
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
            ", annotations: {svc-lb.io/lb-algorithm: roundrobin}",
        ),
        svc(
            "random",
            "10.96.0.5",
            "",
            ", annotations: {svc-lb.io/lb-algorithm: random}",
        ),
    ];
    let t = translate(&load_yaml(&docs.join("---\n")), &cfg(&[], None));
    let policies: Vec<(String, u32, Option<LbAlgorithm>)> = t
        .state
        .frontends
        .values()
        .map(|f| {
            (
                f.service.name.clone(),
                f.policy.affinity_timeout_s,
                f.policy.algorithm,
            )
        })
        .collect();
    assert_eq!(
        policies,
        [
            ("none".into(), 0, None),
            ("default".into(), 10_800, None),
            ("custom".into(), 60, Some(LbAlgorithm::Maglev)),
            // Invalid values lose only the option, the Service is still programmed.
            ("bad".into(), 0, None),
            ("random".into(), 0, Some(LbAlgorithm::Random)),
        ]
    );
    assert_eq!(
        rejected(&t),
        [
            "Service default/bad: sessionAffinityConfig.clientIP.timeoutSeconds 0 is not in \
             1-86400; no session affinity",
            "Service default/bad: annotation svc-lb.io/lb-algorithm: \"roundrobin\" is not \
             random or maglev; using the default",
        ]
    );
}

#[test]
fn load_balancer_source_ranges_apply_to_lb_frontends_only() {
    let lb = |name: &str, ip: &str, ranges: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: LoadBalancer, clusterIP: {ip}, loadBalancerSourceRanges: [{ranges}],\n\
             \x20 ports: [{{port: 80, nodePort: 3008{d}}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.{d}}}]}}}}\n",
            d = &ip[ip.len() - 1..]
        )
    };
    let docs = [
        lb(
            "ok",
            "10.96.0.1",
            "'192.0.2.77/24', '198.51.100.5', '2001:db8::/32'",
        ),
        lb("v6only", "10.96.0.2", "'2001:db8::/32'"),
        lb("bad", "10.96.0.3", "'192.0.2.0/33'"),
    ];
    let t = translate(
        &load_yaml(&docs.join("---\n")),
        &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None),
    );
    let ranges: Vec<String> = t
        .state
        .frontends
        .values()
        .map(|f| format!("{} {} {:?}", f.key, f.kind, f.policy.source_ranges))
        .collect();
    assert_eq!(
        ranges,
        [
            "10.96.0.1:80/TCP ClusterIP []",
            "10.96.0.2:80/TCP ClusterIP []",
            "10.96.0.3:80/TCP ClusterIP []",
            "172.31.0.1:30081/TCP NodePort []",
            "172.31.0.1:30082/TCP NodePort []",
            "172.31.0.1:30083/TCP NodePort []",
            // Host bits cleared, a bare address is a /32, IPv6 entries are the other family's.
            "203.0.113.1:80/TCP LoadBalancer [(192.0.2.0, 24), (198.51.100.5, 32)]",
            // Only IPv6 ranges: no IPv4 restriction (kube-proxy filters per family).
            "203.0.113.2:80/TCP LoadBalancer []",
        ]
    );
    // Invalid: fail closed (no LoadBalancer frontend), the rest of the Service stays.
    assert_eq!(
        rejected(&t),
        [
            "Service default/bad: loadBalancerSourceRanges: invalid CIDR \"192.0.2.0/33\"; \
          no LoadBalancer frontends"
        ]
    );
}

#[test]
fn traffic_policy_local_uses_this_nodes_endpoints() {
    let svc = |name: &str, ip: &str, np: u16, policies: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{type: NodePort, clusterIP: {ip}, ports: [{{port: 80, nodePort: {np}}}]{policies}}}\n"
        )
    };
    let slice = |svc: &str, eps: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: IPv4\nports: [{{name: '', port: 8080}}]\nendpoints:\n{eps}"
        )
    };
    let eps = "- {addresses: [10.0.1.1], nodeName: node-1}\n\
               - {addresses: [10.0.2.1], nodeName: node-2}\n\
               - {addresses: [10.0.1.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}\n";
    let docs = [
        svc("ext", "10.96.0.1", 30001, ", externalTrafficPolicy: Local"),
        slice("ext", eps),
        svc("int", "10.96.0.2", 30002, ", internalTrafficPolicy: Local"),
        slice("int", eps),
        // Only a terminating endpoint on this node: the fallback applies among local ones.
        svc("term", "10.96.0.3", 30003, ", externalTrafficPolicy: Local"),
        slice(
            "term",
            "- {addresses: [10.0.1.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.2.1], nodeName: node-2}\n",
        ),
        // No endpoint on this node.
        svc(
            "remote",
            "10.96.0.4",
            30004,
            ", externalTrafficPolicy: Local",
        ),
        slice("remote", "- {addresses: [10.0.2.1], nodeName: node-2}\n"),
    ];
    let objects = load_yaml(&docs.join("---\n"));
    let t = translate(
        &objects,
        &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], Some("node-1")),
    );
    let got: Vec<String> = t
        .state
        .frontends
        .values()
        .map(|f| {
            let b: Vec<String> = f.backends.iter().map(|b| b.ip.to_string()).collect();
            format!(
                "{} {}{} -> {}",
                f.key,
                f.kind,
                if f.policy.local_only { " local" } else { "" },
                b.join(",")
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "10.96.0.1:80/TCP ClusterIP -> 10.0.1.1,10.0.2.1",
            "10.96.0.2:80/TCP ClusterIP local -> 10.0.1.1",
            "10.96.0.3:80/TCP ClusterIP -> 10.0.2.1",
            "10.96.0.4:80/TCP ClusterIP -> 10.0.2.1",
            "172.31.0.1:30001/TCP NodePort local -> 10.0.1.1",
            // The in-cluster twins of the Local frontends: every ready endpoint.
            "172.31.0.1:30001/TCP (in-cluster) NodePort -> 10.0.1.1,10.0.2.1",
            "172.31.0.1:30002/TCP NodePort -> 10.0.1.1,10.0.2.1",
            "172.31.0.1:30003/TCP NodePort local -> 10.0.1.2",
            "172.31.0.1:30003/TCP (in-cluster) NodePort -> 10.0.2.1",
            "172.31.0.1:30004/TCP NodePort local -> ",
            "172.31.0.1:30004/TCP (in-cluster) NodePort -> 10.0.2.1",
        ]
    );
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    // A twin's endpoints on other nodes are SNATed like under policy Cluster.
    let twin = FrontendKey {
        ip: Ipv4Addr::new(172, 31, 0, 1),
        port: 30004,
        proto: Proto::Tcp,
        internal: true,
    };
    assert_eq!(
        t.state.frontends[&twin].policy.remote_backends,
        [Ipv4Addr::new(10, 0, 2, 1)].into()
    );

    // Without --node-name locality is unknown: Cluster, reported.
    let t = translate(&objects, &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None));
    assert!(t.state.frontends.values().all(|f| !f.policy.local_only));
    assert_eq!(
        rejected(&t)[0],
        "Service default/ext: externalTrafficPolicy Local needs --node-name to know which \
         endpoints are local; using Cluster"
    );
}

#[test]
fn traffic_policy_local_with_pods_uses_their_node_name() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.9, internalTrafficPolicy: Local, selector: {app: a}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: here, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: there, labels: {app: a}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.2.5}
"#;
    let t = translate(&load_yaml(yaml), &cfg(&[], Some("node-1")));
    assert_eq!(
        lines(&t),
        ["10.96.0.9:80/TCP ClusterIP default/s:80 -> 10.0.1.5:80"]
    );
}

#[test]
fn backends_on_other_nodes_are_marked_remote_for_every_frontend() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {type: NodePort, clusterIP: 10.96.0.9, ports: [{port: 80, nodePort: 30009}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: '', port: 8080}]
endpoints:
- {addresses: [10.0.1.1], nodeName: node-1}
- {addresses: [10.0.2.1], nodeName: node-2}
- {addresses: [10.0.3.1]}
"#;
    let objects = load_yaml(yaml);
    let node_ip = [Ipv4Addr::new(172, 31, 0, 1)];
    let t = translate(&objects, &cfg(&node_ip, Some("node-1")));
    assert_eq!(t.state.frontends.len(), 2);
    for f in t.state.frontends.values() {
        assert_eq!(f.backends.len(), 3, "{f:?}");
        // Unknown node (no nodeName) counts as local: no SNAT, like a single node.
        assert_eq!(
            f.policy.remote_backends.iter().collect::<Vec<_>>(),
            [&Ipv4Addr::new(10, 0, 2, 1)],
            "{f:?}"
        );
    }
    // Without --node-name nothing is known to be remote.
    let t = translate(&objects, &cfg(&node_ip, None));
    assert!(
        t.state
            .frontends
            .values()
            .all(|f| f.policy.remote_backends.is_empty())
    );
}

#[test]
fn health_checks_count_ready_local_endpoints_once_per_address() {
    let svc = |name: &str, ip: &str, kind: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{type: {kind}, clusterIP: {ip}, externalTrafficPolicy: {policy}, \
             healthCheckNodePort: 32100, ports: [{{name: http, port: 80, nodePort: 30100}}, \
             {{name: https, port: 443, nodePort: 30443}}]}}\n"
        )
    };
    let slice = |name: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: https, port: 8443}}]\n\
             endpoints:\n\
             - {{addresses: [10.0.1.1], nodeName: node-1}}\n\
             - {{addresses: [10.0.1.2], nodeName: node-1, conditions: {{ready: false, serving: true, terminating: true}}}}\n\
             - {{addresses: [10.0.2.1], nodeName: node-2}}\n"
        )
    };
    let docs = [
        svc("lb", "10.96.0.1", "LoadBalancer", "Local"),
        slice("lb"),
        // Cluster policy and plain NodePort Services have no health check.
        svc("cluster", "10.96.0.2", "LoadBalancer", "Cluster"),
        slice("cluster"),
        svc("np", "10.96.0.3", "NodePort", "Local"),
        slice("np"),
    ];
    // Distinct node ports per Service so none is rejected for a conflict.
    let docs: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            d.replace("30100", &(30100 + i).to_string())
                .replace("30443", &(30200 + i).to_string())
        })
        .collect();
    let objects = load_yaml(&docs.join("---\n"));
    let on = |node: &str| translate(&objects, &cfg(&[], Some(node))).health_checks;
    let check = |n| HealthCheck {
        namespace: "shop".into(),
        name: "lb".into(),
        port: 32100,
        local_endpoints: n,
    };
    // Two ports, one ready address: 1 (the terminating one does not count).
    assert_eq!(on("node-1"), [check(1)]);
    assert_eq!(on("node-2"), [check(1)]);
    assert_eq!(on("node-3"), [check(0)]);
    // Without --node-name the Local policy is not applied: no health check.
    assert!(
        translate(&objects, &cfg(&[], None))
            .health_checks
            .is_empty()
    );
}

#[test]
fn sctp_is_clusterip_only_and_never_translates_ports() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: diameter}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  externalIPs: [198.51.100.30]
  ports:
  - {name: diameter, protocol: SCTP, port: 3868, nodePort: 30868}
  - {name: other, protocol: SCTP, port: 3869, targetPort: 9999}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: diameter-1, labels: {kubernetes.io/service-name: diameter}}
addressType: IPv4
ports: [{name: diameter, protocol: SCTP, port: 3868}]
endpoints:
- {addresses: [10.0.1.1]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: diameter-2, labels: {kubernetes.io/service-name: diameter}}
addressType: IPv4
ports: [{name: diameter, protocol: SCTP, port: 4000}]
endpoints:
- {addresses: [10.0.2.1]}
"#;
    let t = translate(
        &load_yaml(yaml),
        &cfg(&[Ipv4Addr::new(172, 31, 0, 1)], None),
    );
    // The slice publishing another port is skipped: its endpoint would need a port rewrite.
    assert_eq!(
        lines(&t),
        ["10.96.0.30:3868/SCTP ClusterIP default/diameter:diameter -> 10.0.1.1:3868"]
    );
    assert_eq!(
        rejected(&t),
        [
            "Service default/diameter: port diameter: SCTP is served on the ClusterIP only; \
             no NodePort, externalIP or LoadBalancer frontends",
            "Service default/diameter: port other: SCTP needs targetPort equal to port (3869): \
             SCTP ports are not translated",
        ]
    );
}
