//! End to end: `svc-lb service list`, `service NAME --url` and `debug services --list` against
//! a running agent's pinned maps, and the printed URL really answers from the client namespace.

use std::{net::SocketAddr, process::Output};

use svc_lb_tests::{agent::AgentGuard, client, fixture, netns::POD_NAMES};

fn stdout_ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "svc-lb {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn service_list_urls_reach_the_service() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let list = stdout_ok("service list", agent.cli(&["service", "list"]));
    assert_eq!(
        list,
        "\
NAMESPACE  NAME          TYPE       URL
default    dns           ClusterIP  No node port
default    frontend-svc  ClusterIP  No node port
default    web-service   NodePort   http://172.31.0.1:30080
"
    );
    // The same list through `debug services --list`, and the namespace filter.
    assert_eq!(
        stdout_ok(
            "debug services --list",
            agent.cli(&["debug", "services", "--list", "-A"])
        ),
        list
    );
    assert_eq!(
        stdout_ok(
            "service list -n kube-system",
            agent.cli(&["service", "list", "-n", "kube-system"])
        ),
        "NAMESPACE  NAME  TYPE  URL\n"
    );

    let url = stdout_ok(
        "service web-service --url",
        agent.cli(&["service", "web-service", "-n", "default", "--url"]),
    );
    assert_eq!(url, "http://172.31.0.1:30080\n");
    // What a user would do next: open the URL from outside the node.
    let addr: SocketAddr = url
        .trim()
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("http://IP:PORT");
    let answer = client::http_get(&topo.client, addr).expect("GET the printed URL");
    assert!(POD_NAMES.contains(&answer.as_str()), "answer {answer:?}");

    let out = agent.cli(&["service", "frontend-svc", "--url"]);
    assert!(!out.status.success(), "a ClusterIP Service has no URL");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: service default/frontend-svc has no node port\n"
    );
    let out = agent.cli(&["service", "nope", "--url"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("default/nope is not programmed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
