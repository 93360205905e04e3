//! End to end: the container image `cargo xtask image` built, loaded into podman (runc) and run
//! the way deploy/daemonset.yaml runs it, in the test's node namespace. Needs root, podman and
//! runc (`cargo xtask setup`), and the image archive (`cargo xtask image`; `cargo xtask test`
//! builds it before the tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use svc_lb_tests::{
    client::{self, HttpConn},
    container::{self, ContainerAgent, Podman, TestCgroup},
    fixture, wait_for,
};

/// `svc-lb debug services -o json` from the host: frontend -> its backends' addresses.
fn programmed(agent: &ContainerAgent<'_>) -> BTreeMap<String, BTreeSet<String>> {
    let out = agent.host_cli(&["debug", "services", "-o", "json"]);
    assert!(
        out.status.success(),
        "svc-lb debug services from the host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("array of frontends")
        .iter()
        .map(|s| {
            let backends = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{}:{}",
                        b["address"].as_str().unwrap_or_default(),
                        b["port"]
                    )
                })
                .collect();
            (
                s["frontend"].as_str().unwrap_or_default().to_string(),
                backends,
            )
        })
        .collect()
}

/// Names of the cgroup programs `bpftool` sees attached to `cgroup`.
fn cgroup_progs(cgroup: &PathBuf) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn image_runs_as_the_daemonset_runs_it_and_pins_outlive_the_container() {
    let archive = container::image_archive();
    let (topo, dir) = fixture::standard();
    let podman = Podman::new(&topo.prefix);

    // The archive loads under exactly the name the DaemonSet runs, with the Cargo version.
    let loaded = podman.load(&archive);
    let (ds_container, _) = container::daemonset_container();
    let image = ds_container.image.clone().expect("DaemonSet image");
    assert_eq!(
        loaded,
        std::slice::from_ref(&image),
        "names loaded from {}",
        archive.display()
    );
    assert_eq!(
        podman.label(&image, "org.opencontainers.image.version"),
        container::VERSION
    );
    // The entrypoint is svc-lb, and it is the binary of this version.
    let out = podman.run(&[
        "run",
        "--rm",
        "--ulimit=nofile=1024:1024",
        &image,
        "--version",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("svc-lb {}", container::VERSION)
    );

    // The DaemonSet mounts the host's cgroup v2 root for the socket LB; here a child cgroup
    // stands in for it.
    let cg = TestCgroup::new(&topo.prefix);
    let host_paths = BTreeMap::from([("/sys/fs/cgroup".to_string(), cg.path.clone())]);
    let agent = ContainerAgent::start(&topo, &podman, &image, &dir.path, "node-1", &host_paths);

    // Traffic from the client namespace reaches every pod through the agent's datapath.
    wait_for(
        "frontend-svc 10.96.0.10:80 to answer through the containerized agent",
        Duration::from_secs(30),
        || {
            agent.assert_running();
            client::http_get_within(
                &topo.client,
                fixture::frontend(),
                Duration::from_millis(300),
            )
            .ok()
        },
    );
    let seen: BTreeSet<String> = (0..30)
        .map(|i| {
            client::http_get(&topo.client, fixture::frontend())
                .unwrap_or_else(|e| panic!("request {i}: {e}"))
        })
        .collect();
    assert_eq!(seen.len(), 3, "backends answering: {seen:?}");

    // The host sees the pins the container made, through the bind-mounted bpffs.
    let want: BTreeSet<String> = topo.pods.iter().map(|p| format!("{}:5000", p.ip)).collect();
    let maps = programmed(&agent);
    assert_eq!(maps.get("10.96.0.10:80"), Some(&want), "{maps:?}");
    // The socket LB attached to the cgroup mounted the way the DaemonSet mounts the host's.
    let progs = cgroup_progs(&cg.path);
    assert!(
        progs.contains("connect4"),
        "no connect4 program on {}: {progs}",
        cg.path.display()
    );

    // An established connection survives the container stopping (SIGTERM, as the kubelet does
    // on a rolling update) and starting again: the pinned programs and maps outlive it.
    let mut conn = HttpConn::connect(&topo.client, fixture::frontend()).expect("connect");
    let backend = conn.get().expect("first request");
    agent.stop(Duration::from_secs(10));
    assert!(!agent.running());
    assert_eq!(
        agent.exit_code(),
        "0",
        "graceful exit on SIGTERM; log:\n{}",
        agent.logs()
    );
    assert_eq!(conn.get().expect("request, container stopped"), backend);
    client::http_get(&topo.client, fixture::frontend())
        .expect("new connection while the container is stopped");
    assert_eq!(programmed(&agent).get("10.96.0.10:80"), Some(&want));

    agent.start_again();
    let t0 = Instant::now();
    let mut news = BTreeSet::new();
    while t0.elapsed() < Duration::from_secs(4) {
        agent.assert_running();
        assert_eq!(
            conn.get().expect("keep-alive request across the restart"),
            backend,
            "established connection moved after {:?}",
            t0.elapsed()
        );
        news.insert(
            client::http_get(&topo.client, fixture::frontend())
                .expect("new connection across the restart"),
        );
    }
    assert!(news.len() >= 2, "new connections after restart: {news:?}");
    // The restarted agent keeps the Service programmed.
    assert_eq!(programmed(&agent).get("10.96.0.10:80"), Some(&want));
    agent.assert_running();
}
