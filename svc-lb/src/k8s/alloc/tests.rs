use std::path::PathBuf;

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};

use super::*;

/// The tutorial's files, verbatim (issue 11).
const FRONTEND_SVC: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: frontend-svc
spec:
  selector:
    app: frontend
  ports:
    - protocol: TCP
      port: 80
      targetPort: 5000
";

const WEB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web-service
  labels:
    run: web-service
spec:
  type: NodePort
  ports:
  - port: 8080
    protocol: TCP
  selector:
    k8s-app: webserver
";

/// A Service from YAML, said to come from `<name>.yaml`, document 1, line 1.
struct Svc {
    svc: Service,
    at: Location,
}

fn svc(yaml: &str) -> Svc {
    let svc: Service = serde_yaml::from_str(yaml).expect("test YAML parses");
    let name = svc.metadata.name.clone().unwrap_or_default();
    Svc {
        svc,
        at: Location {
            file: PathBuf::from(format!("/m/{name}.yaml")),
            document: 1,
            line: 1,
            item: None,
        },
    }
}

/// A minimal Service: `extra` is appended to its spec (indented by 2).
fn simple(name: &str, extra: &str) -> Svc {
    let extra: String = extra.lines().map(|l| format!("  {l}\n")).collect();
    svc(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    \
         app: {name}\n{extra}"
    ))
}

fn run(svcs: &[&Svc], record: &Record, cfg: &AllocConfig) -> Allocation {
    allocate(
        svcs.iter().map(|s| Input {
            service: &s.svc,
            origin: Some(&s.at),
        }),
        record,
        cfg,
    )
}

fn run0(svcs: &[&Svc]) -> Allocation {
    run(svcs, &Record::new(), &AllocConfig::default())
}

fn cfg(cidrs: &[&str], ports: RangeInclusive<u16>) -> AllocConfig {
    AllocConfig {
        service_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        node_ports: ports,
    }
}

fn find<'a>(a: &'a Allocation, name: &str) -> &'a Service {
    a.services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{name} not in the output"))
}

fn cluster_ip(a: &Allocation, name: &str) -> String {
    find(a, name)
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .clone()
        .unwrap_or_default()
}

fn node_ports(a: &Allocation, name: &str) -> Vec<Option<i32>> {
    find(a, name)
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port)
        .collect()
}

fn messages(a: &Allocation) -> Vec<String> {
    a.problems.iter().map(ToString::to_string).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn tutorial_files_get_a_cluster_ip_and_a_node_port() {
    let (frontend, web) = (svc(FRONTEND_SVC), svc(WEB_SERVICE));
    let a = run0(&[&frontend, &web]);
    assert!(a.problems.is_empty(), "{:?}", messages(&a));
    let range: ServiceCidr = DEFAULT_SERVICE_CIDR.parse().unwrap();
    for name in ["frontend-svc", "web-service"] {
        let addr = ip(&cluster_ip(&a, name));
        assert!(range.contains(addr), "{name}: {addr}");
        assert_eq!(range.reserved(addr), None, "{name}: {addr}");
        let spec = find(&a, name).spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ips, Some(vec![addr.to_string()]));
        assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    }
    assert_ne!(
        cluster_ip(&a, "frontend-svc"),
        cluster_ip(&a, "web-service")
    );
    // frontend-svc: ClusterIP, targetPort as given, no node port.
    let spec = find(&a, "frontend-svc").spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let p = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(
        (p.port, p.target_port.clone()),
        (80, Some(IntOrString::Int(5000)))
    );
    assert_eq!(p.node_port, None);
    assert_eq!(spec.external_traffic_policy, None);
    // web-service: targetPort defaults to port, a node port from the default range.
    let spec = find(&a, "web-service").spec.as_ref().unwrap();
    let p = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(p.target_port, Some(IntOrString::Int(8080)));
    let np = p.node_port.unwrap();
    assert!((30000..=32767).contains(&np), "{np}");
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    // Both are recorded.
    let rec = &a.record.services["default/web-service"];
    assert_eq!(rec.cluster_ips, vec![ip(&cluster_ip(&a, "web-service"))]);
    assert_eq!(
        rec.node_ports,
        vec![RecordedNodePort {
            name: String::new(),
            port: 8080,
            protocol: "TCP".into(),
            node_port: np as u16,
        }]
    );
    assert_eq!(a.record.services.len(), 2);
}

#[test]
fn same_answer_for_any_input_order_and_on_every_node() {
    let svcs: Vec<Svc> = (0..40)
        .map(|i| simple(&format!("s{i}"), "type: NodePort\nports:\n- port: 80"))
        .collect();
    // A small range, so that hashes collide and probing decides.
    let c = cfg(&["10.0.0.0/26"], 30000..=30063);
    let forward: Vec<&Svc> = svcs.iter().collect();
    let mut backward = forward.clone();
    backward.reverse();
    let mut shuffled = forward.clone();
    shuffled.sort_by_key(|s| seed(s.svc.metadata.name.as_deref().unwrap()));
    let a = run(&forward, &Record::new(), &c);
    assert!(a.problems.is_empty(), "{:?}", messages(&a));
    for order in [&backward, &shuffled] {
        let b = run(order, &Record::new(), &c);
        assert_eq!(b.record, a.record);
        for s in &svcs {
            let name = s.svc.metadata.name.as_deref().unwrap();
            assert_eq!(cluster_ip(&b, name), cluster_ip(&a, name), "{name}");
            assert_eq!(node_ports(&b, name), node_ports(&a, name), "{name}");
        }
    }
    // And the output keeps the input order.
    let b = run(&backward, &Record::new(), &c);
    assert_eq!(b.services[0].metadata.name.as_deref(), Some("s39"));
}

#[test]
fn restart_and_manifest_edits_keep_addresses() {
    let c = cfg(&["10.0.0.0/28"], 30000..=30015);
    let b = simple("b", "type: NodePort\nports:\n- name: http\n  port: 80");
    let first = run(&[&b], &Record::new(), &c);
    let (b_ip, b_np) = (cluster_ip(&first, "b"), node_ports(&first, "b"));
    // A newcomer whose hash lands on b's address and port, created earlier than b.
    let collider = (0..1000)
        .map(|i| format!("a{i}"))
        .find(|n| {
            let alone = run(
                &[&simple(
                    n,
                    "type: NodePort\nports:\n- name: http\n  port: 80",
                )],
                &Record::new(),
                &c,
            );
            cluster_ip(&alone, n) == b_ip && node_ports(&alone, n) == b_np
        })
        .expect("some name collides in a /28 and 16 ports");
    let mut newcomer = simple(
        &collider,
        "type: NodePort\nports:\n- name: http\n  port: 80",
    );
    newcomer.svc.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2020-01-01T00:00:00Z".parse().unwrap(),
        ));
    // Restart with the record: b keeps both, the newcomer probes on.
    let second = run(&[&newcomer, &b], &first.record, &c);
    assert!(second.problems.is_empty(), "{:?}", messages(&second));
    assert_eq!(cluster_ip(&second, "b"), b_ip);
    assert_eq!(node_ports(&second, "b"), b_np);
    assert_ne!(cluster_ip(&second, &collider), b_ip);
    assert_ne!(node_ports(&second, &collider), b_np);
    // Without the record (a fresh node) the earlier creationTimestamp would win: the record
    // is what keeps b in place.
    let fresh = run(&[&newcomer, &b], &Record::new(), &c);
    assert_eq!(cluster_ip(&fresh, &collider), b_ip);

    // Edits: another port, a new selector, even the allocated values written in by hand or
    // left out again: b keeps its address and its port's node port.
    let edited = simple(
        "b",
        &format!(
            "type: NodePort\nclusterIP: {b_ip}\nports:\n- name: http\n  port: 80\n- name: admin\n  \
             port: 9000"
        ),
    );
    let third = run(&[&newcomer, &edited], &second.record, &c);
    assert!(third.problems.is_empty(), "{:?}", messages(&third));
    assert_eq!(cluster_ip(&third, "b"), b_ip);
    assert_eq!(node_ports(&third, "b")[0], b_np[0]);
    let fourth = run(&[&b, &newcomer], &third.record, &c);
    assert_eq!(cluster_ip(&fourth, "b"), b_ip);
    assert_eq!(node_ports(&fourth, "b"), b_np);
    assert_eq!(
        cluster_ip(&fourth, &collider),
        cluster_ip(&second, &collider)
    );
    // Many restarts: nothing moves.
    let mut rec = fourth.record.clone();
    for _ in 0..3 {
        let again = run(&[&b, &newcomer], &rec, &c);
        assert_eq!(again.record, rec);
        rec = again.record;
    }
}

#[test]
fn deleted_services_release_their_values() {
    let c = cfg(&["10.0.0.0/30"], 30000..=30000);
    let a = simple("a", "type: NodePort\nports:\n- port: 80");
    let first = run(&[&a], &Record::new(), &c);
    assert_eq!(cluster_ip(&first, "a"), "10.0.0.2");
    assert_eq!(node_ports(&first, "a"), vec![Some(30000)]);
    // a is gone: b gets both (the range has room for one Service only).
    let b = simple("b", "type: NodePort\nports:\n- port: 80");
    let second = run(&[&b], &first.record, &c);
    assert!(second.problems.is_empty(), "{:?}", messages(&second));
    assert_eq!(cluster_ip(&second, "b"), "10.0.0.2");
    assert_eq!(node_ports(&second, "b"), vec![Some(30000)]);
    assert_eq!(
        second.record.services.keys().collect::<Vec<_>>(),
        vec!["default/b"]
    );
}

#[test]
fn first_owner_keeps_an_explicit_cluster_ip() {
    let frontend = svc(FRONTEND_SVC);
    let first = run0(&[&frontend]);
    let taken = cluster_ip(&first, "frontend-svc");
    // `default/aaa-dup` sorts first and asks for frontend-svc's address.
    let dup = simple(
        "aaa-dup",
        &format!("type: NodePort\nclusterIP: {taken}\nports:\n- port: 80"),
    );
    let second = run(&[&dup, &frontend], &first.record, &AllocConfig::default());
    assert_eq!(cluster_ip(&second, "frontend-svc"), taken);
    // The newcomer has no ClusterIP but keeps its other frontends (its node port).
    assert_eq!(cluster_ip(&second, "aaa-dup"), "");
    assert_eq!(
        find(&second, "aaa-dup").spec.as_ref().unwrap().cluster_ips,
        None
    );
    assert!(node_ports(&second, "aaa-dup")[0].is_some());
    assert_eq!(
        messages(&second),
        vec![format!(
            "/m/aaa-dup.yaml: document 1 (line 1): Service default/aaa-dup: spec.clusterIPs[0]: \
             {taken} is already used by Service default/frontend-svc (/m/frontend-svc.yaml: \
             document 1 (line 1)); no IPv4 ClusterIP frontends"
        )]
    );
    // The loser is remembered as seen, not as owner: it stays refused on every restart.
    assert_eq!(
        second.record.services["default/aaa-dup"].cluster_ips,
        Vec::<IpAddr>::new()
    );
    let third = run(&[&dup, &frontend], &second.record, &AllocConfig::default());
    assert_eq!(cluster_ip(&third, "frontend-svc"), taken);
    assert_eq!(third.problems, second.problems);
    // Once the owner is deleted, the newcomer gets it.
    let fourth = run(&[&dup], &third.record, &AllocConfig::default());
    assert_eq!(cluster_ip(&fourth, "aaa-dup"), taken);
}

#[test]
fn explicit_claims_without_a_record_go_by_creation_time_then_first_seen() {
    let c = AllocConfig::default();
    let mk = |name: &str, ts: Option<&str>| {
        let mut s = simple(name, "clusterIP: 10.96.0.10\nports:\n- port: 80");
        s.svc.metadata.creation_timestamp =
            ts.map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.parse().unwrap()));
        s
    };
    // Earlier creationTimestamp wins over name order.
    let (old, new) = (
        mk("zzz", Some("2020-01-01T00:00:00Z")),
        mk("aaa", Some("2024-01-01T00:00:00Z")),
    );
    let a = run(&[&new, &old], &Record::new(), &c);
    assert_eq!(cluster_ip(&a, "zzz"), "10.96.0.10");
    assert_eq!(cluster_ip(&a, "aaa"), "");
    // A timestamp beats none (a hand-written Service counts as created when first seen).
    let (stamped, bare) = (mk("zzz", Some("2024-01-01T00:00:00Z")), mk("aaa", None));
    let a = run(&[&bare, &stamped], &Record::new(), &c);
    assert_eq!(cluster_ip(&a, "zzz"), "10.96.0.10");
    // Neither: the one seen first (a record entry from an earlier read), else by name.
    let (y, x) = (mk("yyy", None), mk("xxx", None));
    let seen_y = run(&[&y], &Record::new(), &c);
    let a = run(&[&x, &y], &seen_y.record, &c);
    assert_eq!(cluster_ip(&a, "yyy"), "10.96.0.10");
    let a = run(&[&y, &x], &Record::new(), &c);
    assert_eq!(cluster_ip(&a, "xxx"), "10.96.0.10");
}

#[test]
fn explicit_cluster_ips_the_api_server_rules() {
    let c = cfg(&["10.96.0.0/12"], DEFAULT_NODE_PORTS);
    let case = |name: &str, addr: &str| {
        let s = simple(name, &format!("clusterIP: {addr}\nports:\n- port: 80"));
        let a = run(&[&s], &Record::new(), &c);
        (cluster_ip(&a, name), messages(&a))
    };
    assert_eq!(case("a", "10.96.0.10"), ("10.96.0.10".into(), vec![]));
    let (got, msgs) = case("a", "10.96.0.1");
    assert_eq!(got, "");
    assert!(
        msgs[0].contains("reserved for the kubernetes Service"),
        "{msgs:?}"
    );
    let (_, msgs) = case("a", "10.96.0.0");
    assert!(
        msgs[0].contains("network address of --service-cidr 10.96.0.0/12"),
        "{msgs:?}"
    );
    let (_, msgs) = case("a", "10.111.255.255");
    assert!(msgs[0].contains("broadcast address"), "{msgs:?}");
    // The kubernetes Service itself may have it, and gets it without asking.
    let k = svc(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: kubernetes\n  namespace: \
                 default\nspec:\n  ports:\n  - name: https\n    port: 443\n    targetPort: 6443\n",
    );
    let a = run(&[&k], &Record::new(), &c);
    assert_eq!(cluster_ip(&a, "kubernetes"), "10.96.0.1");
    // Outside every range: as given (see the module docs).
    assert_eq!(case("a", "172.20.0.10"), ("172.20.0.10".into(), vec![]));
    // Not an address: the Service is skipped, the file named.
    let s = simple("a", "clusterIP: 10.96.0.300\nports:\n- port: 80");
    let a = run(&[&s], &Record::new(), &c);
    assert!(a.services.is_empty());
    assert_eq!(
        messages(&a),
        vec![
            "/m/a.yaml: document 1 (line 1): Service default/a: spec.clusterIPs[0]: \
              \"10.96.0.300\" is not an IP address (or None); Service skipped"
        ]
    );
    // Headless: no address.
    let s = simple("h", "clusterIP: None\nports:\n- port: 80");
    let a = run(&[&s], &Record::new(), &c);
    assert_eq!(cluster_ip(&a, "h"), "None");
    assert!(a.record.services["default/h"].cluster_ips.is_empty());
    // ExternalName: untouched.
    let s = simple("e", "type: ExternalName\nexternalName: example.com");
    let a = run(&[&s], &Record::new(), &c);
    assert_eq!(find(&a, "e").spec.as_ref().unwrap().cluster_ip, None);
}

#[test]
fn a_refused_change_keeps_the_old_address() {
    let c = AllocConfig::default();
    let (a, b) = (
        simple("a", "ports:\n- port: 80"),
        simple("b", "ports:\n- port: 80"),
    );
    let first = run(&[&a, &b], &Record::new(), &c);
    let (a_ip, b_ip) = (cluster_ip(&first, "a"), cluster_ip(&first, "b"));
    // a is edited to ask for b's address: refused, a stays where it was.
    let a2 = simple("a", &format!("clusterIP: {b_ip}\nports:\n- port: 80"));
    let second = run(&[&a2, &b], &first.record, &c);
    assert_eq!(cluster_ip(&second, "a"), a_ip);
    assert_eq!(cluster_ip(&second, "b"), b_ip);
    let msgs = messages(&second);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].ends_with(&format!("; it keeps {a_ip}")), "{msgs:?}");
    // A free address asked for by value: a moves there (the user's choice).
    let a3 = simple("a", "clusterIP: 10.96.5.5\nports:\n- port: 80");
    let third = run(&[&a3, &b], &second.record, &c);
    assert_eq!(cluster_ip(&third, "a"), "10.96.5.5");
    assert_eq!(
        third.record.services["default/a"].cluster_ips,
        vec![ip("10.96.5.5")]
    );
}

#[test]
fn an_invalid_service_keeps_its_values_reserved_until_fixed_or_deleted() {
    let c = AllocConfig::default();
    let a = simple("a", "type: NodePort\nports:\n- port: 80");
    let first = run(&[&a], &Record::new(), &c);
    let (a_ip, a_np) = (cluster_ip(&first, "a"), node_ports(&first, "a")[0].unwrap());
    // A typo in a: skipped, but its address and node port are not free for b.
    let broken = simple("a", "type: NodePrt\nports:\n- port: 80");
    let b = simple(
        "b",
        &format!("type: NodePort\nclusterIP: {a_ip}\nports:\n- port: 80\n  nodePort: {a_np}"),
    );
    let second = run(&[&broken, &b], &first.record, &c);
    assert!(
        second
            .services
            .iter()
            .all(|s| s.metadata.name.as_deref() != Some("a"))
    );
    assert_eq!(cluster_ip(&second, "b"), "");
    assert_eq!(node_ports(&second, "b"), vec![None]);
    let msgs = messages(&second);
    assert!(
        msgs[0].contains("spec.type: unsupported value \"NodePrt\""),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains("already used by Service default/a"),
        "{msgs:?}"
    );
    assert!(msgs[2].contains("nodePort"), "{msgs:?}");
    assert_eq!(
        second.record.services["default/a"],
        first.record.services["default/a"]
    );
    // Fixed: a has both again.
    let third = run(&[&a, &b], &second.record, &c);
    assert_eq!(cluster_ip(&third, "a"), a_ip);
    assert_eq!(node_ports(&third, "a"), vec![Some(a_np)]);
}

#[test]
fn node_ports_api_server_rules() {
    let c = cfg(&["10.96.0.0/12"], 30000..=30099);
    // TCP and UDP of one port number share a node port; given values are honoured.
    let dns = simple(
        "dns",
        "type: NodePort\nports:\n- {name: dns-udp, port: 53, protocol: UDP}\n- {name: dns-tcp, \
         port: 53, protocol: TCP}\n- {name: metrics, port: 9153, nodePort: 30007}",
    );
    let a = run(&[&dns], &Record::new(), &c);
    assert!(a.problems.is_empty(), "{:?}", messages(&a));
    let nps = node_ports(&a, "dns");
    assert_eq!(nps[0], nps[1]);
    assert_ne!(nps[0], Some(30007));
    assert_eq!(nps[2], Some(30007));
    // Across Services a node port is exclusive whatever the protocol.
    let other = simple(
        "other",
        "type: NodePort\nports:\n- {port: 80, protocol: UDP, nodePort: 30007}",
    );
    let a2 = run(&[&dns, &other], &a.record, &c);
    assert_eq!(node_ports(&a2, "other"), vec![None]);
    assert_eq!(
        messages(&a2),
        vec![
            "/m/other.yaml: document 1 (line 1): Service default/other: spec.ports[0].nodePort: \
              nodePort 30007 is already used by Service default/dns (/m/dns.yaml: document 1 \
              (line 1)); no NodePort frontend for port 80"
        ]
    );
    // Out of range, and one node port for two port numbers.
    let bad = simple(
        "bad",
        "type: NodePort\nports:\n- {name: a, port: 80, nodePort: 29999}\n- {name: b, port: 81, \
         nodePort: 30050}\n- {name: c, port: 82, protocol: UDP, nodePort: 30050}",
    );
    let a3 = run(&[&bad], &Record::new(), &c);
    // The out-of-range value stays in the Service: translation rejects that frontend with its
    // own reason (what `svc_lb_rejected_objects` reports); it is never allocated or recorded.
    assert_eq!(node_ports(&a3, "bad"), vec![Some(29999), Some(30050), None]);
    let msgs = messages(&a3);
    assert!(
        msgs[0].contains("29999 is outside the node port range 30000-30099 (--nodeport-range)"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains("30050 is already the node port of port \"b\" of this Service"),
        "{msgs:?}"
    );
    // ClusterIP Services have none; LoadBalancers may opt out of allocation.
    let cip = simple("cip", "ports:\n- {port: 80, nodePort: 30001}");
    let lb = simple(
        "lb",
        "type: LoadBalancer\nallocateLoadBalancerNodePorts: false\nports:\n- {name: a, port: \
         80}\n- {name: b, port: 81, nodePort: 30002}",
    );
    let a4 = run(&[&cip, &lb], &Record::new(), &c);
    assert_eq!(node_ports(&a4, "cip"), vec![None]);
    assert_eq!(node_ports(&a4, "lb"), vec![None, Some(30002)]);
    assert_eq!(
        messages(&a4),
        vec![
            "/m/cip.yaml: document 1 (line 1): Service default/cip: spec.ports[0].nodePort: may \
              not be used when type is ClusterIP; ignored"
        ]
    );
}

#[test]
fn health_check_node_ports() {
    let c = cfg(&["10.96.0.0/12"], 30000..=30099);
    let local = simple(
        "local",
        "type: LoadBalancer\nexternalTrafficPolicy: Local\nports:\n- port: 80",
    );
    let cluster = simple("cluster", "type: LoadBalancer\nports:\n- port: 80");
    let a = run(&[&local, &cluster], &Record::new(), &c);
    assert!(a.problems.is_empty(), "{:?}", messages(&a));
    let hc = find(&a, "local")
        .spec
        .as_ref()
        .unwrap()
        .health_check_node_port
        .unwrap();
    assert!((30000..=30099).contains(&hc));
    assert_ne!(Some(hc), node_ports(&a, "local")[0]);
    assert_eq!(
        find(&a, "cluster")
            .spec
            .as_ref()
            .unwrap()
            .health_check_node_port,
        None
    );
    assert_eq!(
        a.record.services["default/local"].health_check_node_port,
        Some(hc as u16)
    );
    // Stable across restarts; a given one is honoured unless taken.
    let b = run(&[&cluster, &local], &a.record, &c);
    assert_eq!(
        find(&b, "local")
            .spec
            .as_ref()
            .unwrap()
            .health_check_node_port,
        Some(hc)
    );
    let taken = node_ports(&a, "cluster")[0].unwrap();
    let given = simple(
        "given",
        &format!(
            "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: {taken}\nports:\n- \
             port: 80"
        ),
    );
    let d = run(&[&local, &cluster, &given], &a.record, &c);
    assert_eq!(
        find(&d, "given")
            .spec
            .as_ref()
            .unwrap()
            .health_check_node_port,
        None
    );
    assert!(messages(&d)[0].contains(&format!(
        "spec.healthCheckNodePort: node port {taken} is already used by Service default/cluster"
    )));
    // Set where it means nothing: ignored, said so.
    let pointless = simple(
        "p",
        "type: NodePort\nhealthCheckNodePort: 30050\nports:\n- port: 80",
    );
    let e = run(&[&pointless], &Record::new(), &c);
    assert!(messages(&e)[0].contains("may only be set when type is LoadBalancer"));
    assert_eq!(
        find(&e, "p").spec.as_ref().unwrap().health_check_node_port,
        None
    );
}

#[test]
fn exhaustion_is_a_clear_error() {
    let c = cfg(&["10.0.0.0/30"], 30000..=30001);
    let svcs: Vec<Svc> = ["a", "b", "c"]
        .iter()
        .map(|n| simple(n, "type: NodePort\nports:\n- port: 80"))
        .collect();
    let refs: Vec<&Svc> = svcs.iter().collect();
    let a = run(&refs, &Record::new(), &c);
    // /30 has one address to hand out: a gets it (first by name), b and c none.
    assert_eq!(cluster_ip(&a, "a"), "10.0.0.2");
    assert_eq!(cluster_ip(&a, "b"), "");
    assert_eq!(node_ports(&a, "c"), vec![None]);
    let msgs = messages(&a);
    assert_eq!(
        msgs,
        vec![
            "/m/b.yaml: document 1 (line 1): Service default/b: spec.clusterIP: no free address \
             left in --service-cidr 10.0.0.0/30; no IPv4 ClusterIP frontends",
            "/m/c.yaml: document 1 (line 1): Service default/c: spec.clusterIP: no free address \
             left in --service-cidr 10.0.0.0/30; no IPv4 ClusterIP frontends",
            "/m/c.yaml: document 1 (line 1): Service default/c: spec.ports[0].nodePort: no free \
             node port left in --nodeport-range 30000-30001; no NodePort frontend for port 80",
        ]
    );
    // /32 and /31: nothing to hand out at all.
    for r in ["10.0.0.9/32", "10.0.0.8/31"] {
        let a = run(&[&svcs[0]], &Record::new(), &cfg(&[r], DEFAULT_NODE_PORTS));
        assert!(messages(&a)[0].contains("no free address left"), "{r}");
    }
}

#[test]
fn ipv6_and_dual_stack() {
    let v6 = cfg(&["fd00:10:96::/120"], DEFAULT_NODE_PORTS);
    let a_svc = simple("a", "ports:\n- port: 80");
    let a = run(&[&a_svc], &Record::new(), &v6);
    let got = ip(&cluster_ip(&a, "a"));
    let range: ServiceCidr = "fd00:10:96::/120".parse().unwrap();
    assert!(
        range.contains(got) && range.reserved(got).is_none(),
        "{got}"
    );
    assert_eq!(
        find(&a, "a").spec.as_ref().unwrap().ip_families,
        Some(vec!["IPv6".to_string()])
    );
    // The last address of an IPv6 range is usable, the first is the kubernetes Service's.
    let last = simple("last", "clusterIP: fd00:10:96::ff\nports:\n- port: 80");
    assert!(run(&[&last], &Record::new(), &v6).problems.is_empty());
    let first = simple("first", "clusterIP: fd00:10:96::1\nports:\n- port: 80");
    assert!(messages(&run(&[&first], &Record::new(), &v6))[0].contains("kubernetes Service"));

    let dual = cfg(&["10.96.0.0/12", "fd00:10:96::/112"], DEFAULT_NODE_PORTS);
    let prefer = simple("p", "ipFamilyPolicy: PreferDualStack\nports:\n- port: 80");
    let single = simple("s", "ports:\n- port: 80");
    let six = simple("six", "ipFamilies: [IPv6]\nports:\n- port: 80");
    let a = run(&[&prefer, &single, &six], &Record::new(), &dual);
    assert!(a.problems.is_empty(), "{:?}", messages(&a));
    let spec = find(&a, "p").spec.as_ref().unwrap();
    let ips = spec.cluster_ips.clone().unwrap();
    assert_eq!(ips.len(), 2);
    assert!(ip(&ips[0]).is_ipv4() && ip(&ips[1]).is_ipv6(), "{ips:?}");
    assert_eq!(spec.cluster_ip.as_deref(), Some(ips[0].as_str()));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".into(), "IPv6".into()]));
    assert!(ip(&cluster_ip(&a, "s")).is_ipv4());
    assert!(ip(&cluster_ip(&a, "six")).is_ipv6());
    // Both families stay put across restarts.
    let b = run(&[&six, &single, &prefer], &a.record, &dual);
    assert_eq!(find(&b, "p").spec.as_ref().unwrap().cluster_ips, Some(ips));

    // Single-stack IPv4 cluster: PreferDualStack gets IPv4 only, RequireDualStack and an
    // IPv6-only request are refused.
    let v4 = AllocConfig::default();
    let require = simple("r", "ipFamilyPolicy: RequireDualStack\nports:\n- port: 80");
    let a = run(&[&prefer, &require, &six], &Record::new(), &v4);
    assert_eq!(
        find(&a, "p")
            .spec
            .as_ref()
            .unwrap()
            .cluster_ips
            .as_ref()
            .unwrap()
            .len(),
        1
    );
    let msgs = messages(&a);
    assert!(msgs[0].contains("RequireDualStack needs an IPv4 and an IPv6 --service-cidr"));
    assert!(msgs[1].contains("IPv6 requested but there is no IPv6 --service-cidr"));
    assert_eq!(a.services.len(), 1);
}

#[test]
fn external_ips_first_owner_keeps_the_frontend() {
    let c = AllocConfig::default();
    let owner = simple(
        "zz-owner",
        "externalIPs: [192.0.2.10]\nports:\n- {name: http, port: 80}\n- {name: dns, port: 53, \
         protocol: UDP}",
    );
    let first = run(&[&owner], &Record::new(), &c);
    let newcomer = simple(
        "aa-new",
        "externalIPs: [192.0.2.10, 192.0.2.11]\nports:\n- {name: http, port: 80}\n- {name: dns, \
         port: 53, protocol: TCP}",
    );
    let a = run(&[&newcomer, &owner], &first.record, &c);
    // Only 192.0.2.10:80/TCP is contested; 53/TCP and the other address are the newcomer's.
    assert_eq!(
        a.denied.iter().cloned().collect::<Vec<_>>(),
        vec![DeniedFrontend {
            service: ServiceKey::new("default", "aa-new"),
            ip: ip("192.0.2.10"),
            port: 80,
            protocol: "TCP".into(),
        }]
    );
    assert_eq!(
        messages(&a),
        vec![
            "/m/aa-new.yaml: document 1 (line 1): Service default/aa-new: spec.externalIPs: \
              192.0.2.10:80/TCP is already used by Service default/zz-owner (/m/zz-owner.yaml: \
              document 1 (line 1)); no externalIP frontend for it"
        ]
    );
    // Invalid externalIPs lose only themselves.
    let bad = simple(
        "bad",
        "externalIPs: [nope, 127.0.0.1, 192.0.2.20]\nports:\n- port: 80",
    );
    let b = run(&[&bad], &Record::new(), &c);
    assert_eq!(
        find(&b, "bad").spec.as_ref().unwrap().external_ips,
        Some(vec!["192.0.2.20".into()])
    );
    assert_eq!(b.problems.len(), 2);
}

#[test]
fn defaulting_and_validation_like_the_api_server() {
    let c = AllocConfig::default();
    let s = simple(
        "d",
        "ports:\n- {name: a, port: 80, targetPort: 0}\n- {name: b, port: 81, targetPort: \"\"}\n- \
         {name: c, port: 82, targetPort: http-alt}\n- {name: d, port: 83, targetPort: \"8083\"}\n- \
         {name: e, port: 84, protocol: UDP}",
    );
    let a = run(&[&s], &Record::new(), &c);
    let ports = find(&a, "d").spec.as_ref().unwrap().ports.clone().unwrap();
    let targets: Vec<_> = ports
        .iter()
        .map(|p| p.target_port.clone().unwrap())
        .collect();
    assert_eq!(
        targets,
        vec![
            IntOrString::Int(80),
            IntOrString::Int(81),
            IntOrString::String("http-alt".into()),
            IntOrString::Int(8083),
            IntOrString::Int(84),
        ]
    );
    let protocols: Vec<_> = ports.iter().map(|p| p.protocol.clone().unwrap()).collect();
    assert_eq!(protocols, vec!["TCP", "TCP", "TCP", "TCP", "UDP"]);
    assert_eq!(
        messages(&a),
        vec![
            "/m/d.yaml: document 1 (line 1): Service default/d: spec.ports[3].targetPort: \
              \"8083\" is a string, which the API server refuses (a named port needs a letter); \
              read as the number 8083"
        ]
    );

    // Bad ports of a multi-port Service: each skipped, the others served.
    let s = simple(
        "m",
        "ports:\n- {name: ok, port: 80}\n- {name: big, port: 70000}\n- {port: 81}\n- {name: ok, \
         port: 82}\n- {name: Bad_Name, port: 83}\n- {name: proto, port: 84, protocol: ICMP}\n- \
         {name: dup, port: 80}\n- {name: tgt, port: 85, targetPort: 70000}\n- {name: tname, \
         port: 86, targetPort: no--way}",
    );
    let a = run(&[&s], &Record::new(), &c);
    let ports = find(&a, "m").spec.as_ref().unwrap().ports.clone().unwrap();
    assert_eq!(ports.len(), 1);
    let msgs = messages(&a);
    let prefix = "/m/m.yaml: document 1 (line 1): Service default/m: ";
    let expected = [
        "spec.ports[1].port: 70000 is not in 1-65535; port \"big\" skipped, the Service's other \
         ports are served",
        "spec.ports[2].name: required: every port of a multi-port Service needs a name; port 81 \
         skipped, the Service's other ports are served",
        "spec.ports[3].name: duplicate port name \"ok\"; port \"ok\" skipped, the Service's \
         other ports are served",
        "spec.ports[4].name: \"Bad_Name\" is not valid: only lowercase letters, digits and '-' \
         are allowed; port \"Bad_Name\" skipped, the Service's other ports are served",
        "spec.ports[5].protocol: unsupported value \"ICMP\" (TCP, UDP or SCTP); port \"proto\" \
         skipped, the Service's other ports are served",
        "spec.ports[6].port: 80/TCP is already a port of this Service; port \"dup\" skipped, the \
         Service's other ports are served",
        "spec.ports[7].targetPort: 70000 is not in 1-65535; port \"tgt\" skipped, the Service's \
         other ports are served",
        "spec.ports[8].targetPort: \"no--way\" is not a valid port name: '-' may not start or \
         end it, or appear twice in a row; port \"tname\" skipped, the Service's other ports \
         are served",
    ];
    let expected: Vec<String> = expected.iter().map(|e| format!("{prefix}{e}")).collect();
    assert_eq!(msgs, expected);

    // Whole-Service refusals.
    for (name, extra, want) in [
        (
            "Upper",
            "ports:\n- port: 80",
            "metadata.name: \"Upper\" is not a valid Service name",
        ),
        ("noports", "type: ClusterIP", "spec.ports: required"),
        (
            "allbad",
            "ports:\n- port: 0",
            "spec.ports: no valid port left",
        ),
        (
            "bogus",
            "type: Bogus\nports:\n- port: 80",
            "spec.type: unsupported value \"Bogus\"",
        ),
        (
            "twofour",
            "clusterIPs: [10.96.0.5, 10.96.0.6]\nports:\n- port: 80",
            "must be of different IP families",
        ),
        (
            "policy",
            "ipFamilyPolicy: Sometimes\nports:\n- port: 80",
            "spec.ipFamilyPolicy: unsupported value",
        ),
    ] {
        let s = simple(name, extra);
        let a = run(&[&s], &Record::new(), &c);
        assert!(a.services.is_empty(), "{name}");
        let msgs = messages(&a);
        assert!(
            msgs.iter()
                .any(|m| m.contains(want) && m.ends_with("Service skipped")),
            "{name}: {msgs:?}"
        );
    }
    // A headless Service needs no port.
    let h = simple("h", "clusterIP: None");
    assert!(run(&[&h], &Record::new(), &c).problems.is_empty());
}

#[test]
fn a_changed_nodeport_range_moves_recorded_ports_into_it() {
    let s = simple("a", "type: NodePort\nports:\n- port: 80");
    let first = run(
        &[&s],
        &Record::new(),
        &cfg(&["10.96.0.0/12"], 30000..=32767),
    );
    let old = node_ports(&first, "a")[0].unwrap();
    let narrow = if old >= 31000 {
        30000..=30999
    } else {
        31000..=31999
    };
    let second = run(
        &[&s],
        &first.record,
        &cfg(&["10.96.0.0/12"], narrow.clone()),
    );
    let new = node_ports(&second, "a")[0].unwrap();
    assert!(narrow.contains(&(new as u16)));
    assert_eq!(
        messages(&second),
        vec![format!(
            "/m/a.yaml: document 1 (line 1): Service default/a: spec.ports[0].nodePort: {old} is \
             outside the node port range {}-{} (--nodeport-range); now {new}",
            narrow.start(),
            narrow.end()
        )]
    );
    // The ClusterIP stays even though it is outside a new --service-cidr (kube-apiserver
    // leaves existing Services alone too).
    let third = run(&[&s], &second.record, &cfg(&["10.200.0.0/16"], narrow));
    assert_eq!(cluster_ip(&third, "a"), cluster_ip(&first, "a"));
}

#[test]
fn origin_is_optional_and_list_items_are_named() {
    let s = simple("a", "clusterIP: 10.96.0.0\nports:\n- port: 80");
    let a = allocate(
        [Input {
            service: &s.svc,
            origin: None,
        }],
        &Record::new(),
        &AllocConfig::default(),
    );
    assert!(messages(&a)[0].starts_with("Service default/a: spec.clusterIPs[0]"));
    let at = Location {
        file: "/m/list.json".into(),
        document: 2,
        line: 7,
        item: Some(3),
    };
    let a = allocate(
        [Input {
            service: &s.svc,
            origin: Some(&at),
        }],
        &Record::new(),
        &AllocConfig::default(),
    );
    assert!(
        messages(&a)[0].starts_with("/m/list.json: document 2 (line 7), items[3]: Service"),
        "{:?}",
        messages(&a)
    );
}

#[test]
fn tens_of_thousands_of_services() {
    // The manifest mode's scale (a 10 MB manifest of 32k Services): every Service gets a
    // distinct address and node port range permitting, and a restart with the record keeps
    // them all.
    let svcs: Vec<Svc> = (0..32_000)
        .map(|i| simple(&format!("s{i}"), "ports:\n- port: 80"))
        .collect();
    let refs: Vec<&Svc> = svcs.iter().collect();
    let t0 = std::time::Instant::now();
    let a = run0(&refs);
    let fresh = t0.elapsed();
    assert!(a.problems.is_empty(), "{:?}", &messages(&a)[..3]);
    let ips: BTreeSet<IpAddr> = a
        .record
        .services
        .values()
        .flat_map(|e| e.cluster_ips.iter().copied())
        .collect();
    assert_eq!(ips.len(), 32_000);
    let t0 = std::time::Instant::now();
    let b = run(&refs, &a.record, &AllocConfig::default());
    eprintln!(
        "32k Services: {fresh:?} fresh, {:?} with the record",
        t0.elapsed()
    );
    assert_eq!(b.record, a.record);
}
