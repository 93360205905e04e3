//! End to end, kube-proxy's endpoint contract: a pod removed from the Service keeps its
//! established TCP connections until they end (its backend drains), gets no new ones, and a
//! connected UDP client that was talking to it moves to another pod at once (the stale-DNS-
//! backend bug). Needs root.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use svc_lb_tests::{
    agent::AgentGuard,
    client::{self, HttpConn},
    fixture,
    manifests::{self, DNS_VIP},
    netns::Topology,
};

fn dns() -> SocketAddr {
    SocketAddr::from((DNS_VIP, 53))
}

/// A connected UDP socket in the client namespace: it only accepts answers from the VIP, so
/// every answer also proves the reverse NAT.
fn udp_socket(topo: &Topology) -> UdpSocket {
    let sock = topo
        .client
        .in_ns(|| -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(dns())?;
            Ok(s)
        })
        .expect("udp socket");
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock
}

fn ask(sock: &UdpSocket) -> std::io::Result<String> {
    sock.send(b"ping\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Keep-alive connection and connected UDP socket that both reached pod-c.
fn flows_to_pod_c(topo: &Topology) -> (HttpConn, UdpSocket) {
    let mut tcp = None;
    for _ in 0..60 {
        let mut c = HttpConn::connect(&topo.client, fixture::frontend()).expect("connect");
        if c.get().expect("first request") == "pod-c" {
            tcp = Some(c);
            break;
        }
    }
    let tcp = tcp.expect("60 connections never reached pod-c");
    for _ in 0..60 {
        let s = udp_socket(topo);
        if ask(&s).expect("first datagram") == "pod-c" {
            return (tcp, s);
        }
    }
    panic!("60 UDP sockets never reached pod-c");
}

#[test]
fn removed_pod_drains_tcp_and_moves_udp_at_once() {
    let (topo, dir) = fixture::standard();
    let mut agent = AgentGuard::start(&topo, &dir.path);
    fixture::wait_serving(&topo, &mut agent);
    let (mut kept, udp) = flows_to_pod_c(&topo);

    let remaining: Vec<_> = topo.pods.iter().filter(|p| p.name != "pod-c").collect();
    dir.write("services.yaml", &manifests::standard(&remaining));
    dir.write("pods.yaml", &manifests::pods(&remaining));
    let t0 = Instant::now();
    // Applied once 20 new connections in a row avoid pod-c.
    let mut streak = 0;
    svc_lb_tests::wait_for(
        "pod-c to leave frontend-svc",
        Duration::from_secs(10),
        || {
            agent.assert_running();
            match client::http_get_within(&topo.client, fixture::frontend(), Duration::from_secs(1))
            {
                Ok(n) if n != "pod-c" => streak += 1,
                _ => streak = 0,
            }
            (streak >= 20).then_some(())
        },
    );
    let applied = t0.elapsed();

    // UDP: the very next datagram of the connected socket goes to a remaining pod.
    let moved = ask(&udp).expect("connected UDP client after pod-c was removed");
    assert_ne!(moved, "pod-c", "UDP flow stuck on the removed pod");

    // TCP: the established connection keeps talking to pod-c across several reconcile ticks
    // (the agent rescans every 2 s), while new connections never go there.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut news = BTreeSet::new();
    while Instant::now() < until {
        assert_eq!(
            kept.get()
                .expect("established connection to the removed pod"),
            "pod-c",
            "keep-alive connection moved or broke {:?} after the change",
            t0.elapsed()
        );
        let n = client::http_get(&topo.client, fixture::frontend()).expect("new connection");
        assert_ne!(n, "pod-c", "new connection reached the removed pod");
        news.insert(n);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(news.len(), 2, "{news:?}");

    // The agent shows the backend as draining.
    let out = agent.cli(&["debug", "backends", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let pod_c_ip = topo.pod("pod-c").ip.to_string();
    let states: Vec<(String, String)> = rows
        .as_array()
        .expect("array")
        .iter()
        .filter(|r| r["address"] == pod_c_ip.as_str())
        .map(|r| {
            (
                r["protocol"].as_str().unwrap_or("").to_owned(),
                r["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("TCP".to_owned(), "terminating".to_owned())],
        "only the TCP backend with a live connection drains (UDP one deleted): {rows}"
    );
    eprintln!("change applied after {applied:?}");
    agent.assert_running();
}
