//! End to end: deleting a whole Service drains it the way removing its pods does. An
//! established TCP connection through it keeps working (the frontend stays, without backends,
//! while the connection is established), new connections are refused at once, and a connected
//! UDP client is cut off at once (its flow is purged: no stale answers from a Service that no
//! longer exists). The other Services are untouched. Needs root.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    client::{self, HttpConn},
    fixture,
    manifests::{self, DNS_VIP, WEB_PORTS, WEB_VIP},
    netns::Topology,
};

/// A connected UDP socket to the dns-like Service in the client namespace.
fn udp_socket(topo: &Topology) -> UdpSocket {
    let sock = topo
        .client
        .in_ns(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::from((DNS_VIP, 53)))?;
            Ok(s)
        })
        .expect("udp socket");
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    sock
}

fn ask(sock: &UdpSocket) -> io::Result<String> {
    sock.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

#[test]
fn deleted_service_drains_established_tcp_and_cuts_udp() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let mut kept = HttpConn::connect(&topo.client, fixture::frontend()).expect("connect");
    let pod = kept.get().expect("first request");
    let udp = udp_socket(&topo);
    assert!(
        ask(&udp).expect("first datagram").starts_with("pod-"),
        "dns-like answers before the delete"
    );

    // frontend-svc and dns are deleted (with their slices): only web-service is left.
    let pods: Vec<_> = topo.pods.iter().collect();
    dir.write(
        "services.yaml",
        &manifests::join(&[
            manifests::service("web-service", WEB_VIP, ("k8s-app", "webserver"), &WEB_PORTS),
            manifests::endpoint_slice("web-service", &WEB_PORTS, &pods),
        ]),
    );
    let t0 = Instant::now();
    svc_lb_tests::wait_for(
        "frontend-svc to refuse new connections",
        Duration::from_secs(5),
        || {
            agent.assert_running();
            match client::http_get_within(
                &topo.client,
                fixture::frontend(),
                Duration::from_millis(500),
            ) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    );
    eprintln!("delete applied after {:?}", t0.elapsed());

    // UDP: the connected client gets nothing from the deleted Service any more.
    let stale = ask(&udp);
    assert!(
        stale.is_err(),
        "answer from a deleted UDP Service: {stale:?}"
    );

    // TCP: the established connection keeps talking to its pod across rescans.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(
            kept.get()
                .expect("established connection after the Service was deleted"),
            pod,
            "keep-alive connection moved after the delete"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent
            .log_text()
            .contains("removed frontend kept without backends"),
        "the agent says the frontend drains"
    );
    // The other Service is untouched.
    let web = client::http_get(&topo.client, SocketAddr::from((WEB_VIP, 8080)))
        .expect("web-service still served");
    assert!(web.starts_with("pod-"), "{web}");
    agent.assert_running();
}
