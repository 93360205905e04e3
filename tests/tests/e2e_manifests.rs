//! End to end: the agent follows the manifests directory (new, deleted and broken files).
//! Needs root.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    client, fixture,
    manifests::{self, Port},
    wait_for,
};

const NEW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// Connect/read timeout while polling (see `client::http_get_within`).
const POLL: Duration = Duration::from_millis(250);
const NEW_PORTS: [Port; 1] = [Port::tcp("http", 8000, 5000)];

#[test]
fn service_added_then_deleted_at_runtime() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    let addr = SocketAddr::from((NEW_VIP, 8000));
    assert!(
        client::connect(&topo.client, addr, Duration::from_secs(2)).is_err(),
        "{addr} answers before its Service exists"
    );
    let pod_b = topo.pod("pod-b");
    let t0 = Instant::now();
    dir.write(
        "new.yaml",
        &manifests::join(&[
            manifests::service("new-svc", NEW_VIP, ("app", "frontend"), &NEW_PORTS),
            manifests::endpoint_slice("new-svc", &NEW_PORTS, &[pod_b]),
        ]),
    );
    let name = wait_for("the new Service to answer", Duration::from_secs(1), || {
        client::http_get_within(&topo.client, addr, POLL).ok()
    });
    assert_eq!(name, "pod-b");
    eprintln!("new Service served after {:?}", t0.elapsed());

    fs::remove_file(dir.path.join("new.yaml")).expect("remove new.yaml");
    wait_for(
        "the deleted Service to stop answering",
        Duration::from_secs(1),
        || {
            client::connect(&topo.client, addr, POLL)
                .is_err()
                .then_some(())
        },
    );
    // The other Services were not disturbed.
    assert!(client::http_get(&topo.client, fixture::frontend()).is_ok());
    agent.assert_running();
}

#[test]
fn broken_manifest_does_not_disturb_the_rest() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);

    dir.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map\n",
    );
    // A valid change written after the broken file still applies.
    let addr = SocketAddr::from((NEW_VIP, 8000));
    dir.write(
        "new.yaml",
        &manifests::join(&[
            manifests::service("new-svc", NEW_VIP, ("app", "frontend"), &NEW_PORTS),
            manifests::endpoint_slice("new-svc", &NEW_PORTS, &[topo.pod("pod-a")]),
        ]),
    );
    let name = wait_for("the new Service to answer", Duration::from_secs(2), || {
        client::http_get_within(&topo.client, addr, POLL).ok()
    });
    assert_eq!(name, "pod-a");
    for i in 0..10 {
        client::http_get(&topo.client, fixture::frontend())
            .unwrap_or_else(|e| panic!("frontend-svc request {i} with a broken file around: {e}"));
    }
    agent.assert_running();
}
