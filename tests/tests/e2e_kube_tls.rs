//! End to end: how the real agent connects to the API server (run as root, real agent in a
//! node namespace, fake API server in that namespace). Paged lists: more than one page (kube's
//! watcher asks for 500 items a page and follows `metadata.continue`) and a continue token that
//! expires mid-list (the agent lists again and converges).

use std::{net::Ipv4Addr, time::Duration};

use serde_json::Value;
use svc_lb_tests::{
    kube_agent::{KubeAgent, NODE_NAME, serve_in_node},
    kube_api::{FakeApi, Res},
    kube_objects::{Endpoint, endpoint_slice, node, service},
    manifests::FRONTEND_PORTS,
    netns::{NODE_IP, Topology},
    wait_for,
};

/// More Services (each with one EndpointSlice) than one page of kube's watcher (500).
const SERVICES: usize = 620;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `n` Services `bulk-<i>` on 10.97.x.y:80, each with a slice holding pod-a.
fn bulk_cluster(topo: &Topology, n: usize) -> FakeApi {
    let api = FakeApi::new();
    let pod = topo.pod("pod-a").ip;
    for i in 0..n {
        add_service(&api, i, pod);
    }
    api.apply(node(NODE_NAME, &NODE_IP.to_string()));
    api
}

fn add_service(api: &FakeApi, i: usize, pod: Ipv4Addr) {
    let name = format!("bulk-{i}");
    api.apply(service(
        &name,
        &[&vip(i).to_string()],
        ("app", &name),
        &FRONTEND_PORTS,
    ));
    api.apply(endpoint_slice(
        &name,
        &format!("{name}-q8x2z"),
        "IPv4",
        &FRONTEND_PORTS,
        &[Endpoint::ready(pod, "pod-a")],
    ));
}

/// Frontends the agent programmed that have at least one backend (from the pinned maps); 0
/// before the agent pinned its maps.
fn programmed(agent: &KubeAgent<'_>) -> usize {
    let out = agent.cli(&["debug", "services", "-o", "json"]);
    if !out.status.success() {
        return 0;
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("debug services JSON");
    rows.iter()
        .filter(|r| r["backends"].as_array().is_some_and(|b| !b.is_empty()))
        .count()
}

fn wait_programmed(agent: &mut KubeAgent<'_>, want: usize) {
    wait_for(
        &format!("{want} Services with backends in the maps"),
        Duration::from_secs(30),
        || {
            agent.assert_running();
            (programmed(agent) == want).then_some(())
        },
    );
}

/// List requests for `res` that carried a continue token.
fn continued_lists(api: &FakeApi, res: Res) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.res == Some(res) && !r.is_watch() && r.query.contains_key("continue"))
        .count()
}

#[test]
fn paged_initial_list_of_more_than_one_page() {
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, SERVICES);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, &["--node-ip", "10.244.1.1"]);
    wait_programmed(&mut agent, SERVICES);
    for res in [Res::Services, Res::EndpointSlices] {
        let first = api
            .requests()
            .into_iter()
            .find(|r| r.res == Some(res) && !r.is_watch())
            .expect("a list request");
        assert_eq!(
            first.query.get("limit").map(String::as_str),
            Some("500"),
            "{res:?}"
        );
        assert_eq!(continued_lists(&api, res), 1, "{res:?}: second page");
    }
    // The watch after the paged list follows changes.
    add_service(&api, SERVICES, topo.pod("pod-a").ip);
    wait_programmed(&mut agent, SERVICES + 1);
}

#[test]
fn continue_token_expired_mid_list_relists_and_converges() {
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, SERVICES);
    // Both paged lists (Services, EndpointSlices) lose their snapshot before their second page.
    api.expire_next_continues(2);
    serve_in_node(&topo, &api);
    let mut agent = KubeAgent::start(&topo, &["--node-ip", "10.244.1.1"]);
    wait_programmed(&mut agent, SERVICES);
    assert_eq!(api.continues_expired(), 2);
    let relisted = [Res::Services, Res::EndpointSlices]
        .iter()
        .map(|&r| api.lists(r))
        .sum::<usize>();
    // 2 pages each, plus at least one page again for the expired list(s).
    assert!(relisted >= 5, "{relisted} list requests");
    add_service(&api, SERVICES, topo.pod("pod-a").ip);
    wait_programmed(&mut agent, SERVICES + 1);
    agent.assert_running();
}
