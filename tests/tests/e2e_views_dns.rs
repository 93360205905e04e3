//! End to end: `svc-lb run --dns-listen` answers a real resolver client (`dig`, Debian's
//! dnsutils) in the client namespace, over UDP and TCP, and follows manifest changes.

use std::{net::SocketAddr, time::Duration};

use svc_lb_tests::{
    agent::AgentGuard,
    client, fixture,
    manifests::{self, FRONTEND_PORTS},
    netns::{POD_NAMES, Topology},
    wait_for,
};

const DNS: &str = "172.31.0.1";

/// `dig @node <args> +short` from the client namespace: one answer per line.
fn dig(topo: &Topology, args: &[&str]) -> Vec<String> {
    let mut all = vec!["@172.31.0.1", "+short", "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    let out = topo.client.run("dig", &all);
    assert!(
        out.status.success(),
        "dig {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The status dig prints in the full header (`NOERROR`, `NXDOMAIN`, ...).
fn status(topo: &Topology, name: &str) -> String {
    let out = topo
        .client
        .run("dig", &["@172.31.0.1", "+time=2", "+tries=1", name]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{text}"))
        .to_owned()
}

#[test]
fn dig_resolves_services_headless_externalname_and_srv() {
    let (topo, dir) = fixture::standard();
    let pods: Vec<_> = topo.pods.iter().collect();
    let headless = "apiVersion: v1\nkind: Service\nmetadata:\n  name: frontend-headless\n  namespace: default\n\
        spec:\n  clusterIP: None\n  selector:\n    app: frontend\n  ports:\n  - name: http\n    port: 80\n    targetPort: 5000\n";
    let external = "apiVersion: v1\nkind: Service\nmetadata:\n  name: docs\n  namespace: default\n\
        spec:\n  type: ExternalName\n  externalName: kubernetes.io\n";
    dir.write(
        "discovery.yaml",
        &manifests::join(&[
            headless.to_owned(),
            manifests::endpoint_slice("frontend-headless", &FRONTEND_PORTS, &pods),
            external.to_owned(),
        ]),
    );
    let mut agent =
        AgentGuard::start_with(&topo, &dir.path, &["--dns-listen", &format!("{DNS}:53")]);
    fixture::wait_serving(&topo, &mut agent);

    assert_eq!(
        dig(&topo, &["frontend-svc.default.svc.cluster.local"]),
        ["10.96.0.10"]
    );
    assert_eq!(
        dig(&topo, &["+tcp", "frontend-svc.default.svc.cluster.local"]),
        ["10.96.0.10"]
    );
    assert_eq!(
        dig(
            &topo,
            &["SRV", "_http._tcp.web-service.default.svc.cluster.local"]
        ),
        ["0 100 8080 web-service.default.svc.cluster.local."]
    );
    assert_eq!(
        dig(&topo, &["SRV", "_dns._udp.dns.default.svc.cluster.local"]),
        ["0 100 53 dns.default.svc.cluster.local."]
    );
    let mut ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    ips.sort();
    assert_eq!(
        dig(&topo, &["frontend-headless.default.svc.cluster.local"]),
        ips
    );
    let srv = dig(
        &topo,
        &[
            "SRV",
            "_http._tcp.frontend-headless.default.svc.cluster.local",
        ],
    );
    assert_eq!(srv.len(), 3, "{srv:?}");
    assert!(
        srv[0].starts_with("0 100 5000 10-244-")
            && srv[0].ends_with(".frontend-headless.default.svc.cluster.local."),
        "{srv:?}"
    );
    assert_eq!(
        dig(&topo, &["docs.default.svc.cluster.local"]),
        ["kubernetes.io."]
    );
    assert_eq!(status(&topo, "nope.default.svc.cluster.local"), "NXDOMAIN");
    assert_eq!(status(&topo, "example.com"), "REFUSED");

    // What a client does with the answer: connect to it.
    let ip = dig(&topo, &["web-service.default.svc.cluster.local"]).remove(0);
    let answer = client::http_get(&topo.client, SocketAddr::new(ip.parse().unwrap(), 8080))
        .expect("GET the resolved ClusterIP");
    assert!(POD_NAMES.contains(&answer.as_str()), "{answer:?}");

    // Removing the headless Service's manifest removes its name.
    dir.write("discovery.yaml", external);
    wait_for(
        "frontend-headless to disappear",
        Duration::from_secs(10),
        || {
            (status(&topo, "frontend-headless.default.svc.cluster.local") == "NXDOMAIN")
                .then_some(())
        },
    );
}
