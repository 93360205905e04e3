//! End to end: manifest changes and agent restarts while traffic flows. Needs root.

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    client::{self, HttpConn},
    fixture, manifests,
};

/// Opens keep-alive connections to frontend-svc until one lands on a backend accepted by `want`.
fn conn_to(
    topo: &svc_lb_tests::netns::Topology,
    want: impl Fn(&str) -> bool,
) -> (HttpConn, String) {
    for _ in 0..60 {
        let mut conn = HttpConn::connect(&topo.client, fixture::frontend()).expect("connect");
        let name = conn.get().expect("request on new keep-alive connection");
        if want(&name) {
            return (conn, name);
        }
    }
    panic!("60 connections never reached a wanted backend");
}

#[test]
fn removed_pod_stops_receiving_new_connections_within_1s() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let (mut kept, kept_name) = conn_to(&topo, |n| n != "pod-c");

    // pod-c is deleted: it disappears from the Pods and from every EndpointSlice.
    let remaining: Vec<_> = topo.pods.iter().filter(|p| p.name != "pod-c").collect();
    let t0 = Instant::now();
    dir.write("services.yaml", &manifests::standard(&remaining));
    dir.write("pods.yaml", &manifests::pods(&remaining));

    // New connections until 1 s has passed, remembering when pod-c last answered. None may
    // fail: a connection that reached pod-c just before its removal keeps it (removed TCP
    // backends drain), and the others never see a half-updated Service.
    let mut last_pod_c = None;
    let mut broken = Vec::new();
    while t0.elapsed() < Duration::from_secs(1) {
        match client::http_get(&topo.client, fixture::frontend()) {
            Ok(name) if name == "pod-c" => last_pod_c = Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) => broken.push(format!("{:?}: {e}", t0.elapsed())),
        }
    }
    assert!(
        broken.is_empty(),
        "new connections failed during the update: {broken:?}"
    );
    // From now on pod-c must never be chosen.
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let name = client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("request {i} after the update: {e}"));
        assert_ne!(
            name, "pod-c",
            "request {i}: removed pod-c still chosen > 1 s after the manifest change \
             (last before: {last_pod_c:?})"
        );
        seen.insert(name);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()]),
        "remaining backends"
    );
    // The established connection to a remaining backend was never disturbed.
    for _ in 0..5 {
        assert_eq!(kept.get().expect("kept connection after update"), kept_name);
    }
    agent.assert_running();
}

#[test]
fn agent_kill_9_and_restart_keep_connections() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let (mut conn, backend) = conn_to(&topo, |_| true);

    agent.kill_hard();
    // Programs and maps stay pinned: the datapath keeps working without the agent.
    assert_eq!(conn.get().expect("keep-alive request, agent dead"), backend);
    let name = client::http_get(&topo.client, fixture::frontend())
        .expect("new connection while the agent is dead");
    assert!(!name.is_empty());

    agent.restart();
    // During and after the restart (the new agent re-attaches and reconciles), the connection
    // keeps its backend and new connections keep working.
    let t0 = Instant::now();
    let mut news = BTreeSet::new();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            conn.get().expect("keep-alive request across restart"),
            backend,
            "established connection moved to another backend after {:?}",
            t0.elapsed()
        );
        news.insert(
            client::http_get(&topo.client, fixture::frontend())
                .expect("new connection across restart"),
        );
        thread::sleep(Duration::from_millis(50));
    }
    agent.assert_running();
    assert!(news.len() >= 2, "new connections after restart: {news:?}");
}

#[test]
fn restarted_agent_applies_changes_made_while_it_was_down() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    agent.kill_hard();
    let remaining: Vec<_> = topo.pods.iter().filter(|p| p.name != "pod-a").collect();
    dir.write("services.yaml", &manifests::standard(&remaining));
    dir.write("pods.yaml", &manifests::pods(&remaining));
    // Nobody watches the directory now: pod-a is still programmed and still chosen.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(client::http_get(&topo.client, fixture::frontend()).expect("agent down"));
    }
    assert!(
        seen.contains("pod-a"),
        "pod-a gone without an agent? {seen:?}"
    );

    agent.restart();
    // The new agent reconciles at startup: pod-a disappears (poll until 20 new connections in
    // a row avoid it), then stays away.
    let mut streak = 0;
    svc_lb_tests::wait_for(
        "pod-a to be removed after restart",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            match client::http_get(&topo.client, fixture::frontend()) {
                Ok(n) if n != "pod-a" => streak += 1,
                _ => streak = 0,
            }
            (streak >= 20).then_some(())
        },
    );
    for i in 0..20 {
        let name = client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("request {i} after restart: {e}"));
        assert_ne!(
            name, "pod-a",
            "request {i}: removed pod-a chosen after restart"
        );
    }
}
