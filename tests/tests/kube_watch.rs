//! API mode without a kernel: svc-lb's watchers (kube watcher + reflector) against the fake API
//! server, and the desired state they produce through the shared translation. No root needed.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    path::PathBuf,
    time::{Duration, Instant},
};

use svc_lb::{
    k8s::{
        client::client,
        watch::{API_ACCESS, ClusterWatch, READ_VERBS},
    },
    maps::FakeLbMaps,
    model::DesiredState,
    reconcile::{Limits, Reconciler},
    translate::{TranslateConfig, translate},
};
use svc_lb_tests::{
    kube_api::{FakeApi, Res},
    kube_objects::{Endpoint, endpoint_slice, node, service, with_label},
    manifests::Port,
};

const NODE: &str = "node-1";
const HTTP: [Port; 1] = [Port::tcp("http", 80, 5000)];
const WEB: [Port; 1] = [Port {
    node_port: Some(30080),
    ..Port::tcp("http", 8080, 80)
}];

fn pod_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 2)
}

/// The cluster every test starts from.
fn populate(api: &FakeApi) {
    // Two slices for one Service (the controller splits large Services), with a terminating
    // and a not-ready endpoint that must not receive traffic while ready ones exist.
    api.apply(service(
        "frontend-svc",
        &["10.96.0.10"],
        ("app", "frontend"),
        &HTTP,
    ));
    api.apply(endpoint_slice(
        "frontend-svc",
        "frontend-svc-abc12",
        "IPv4",
        &HTTP,
        &[
            Endpoint::ready(pod_ip(1), "pod-a"),
            Endpoint::terminating(pod_ip(4), "pod-old"),
        ],
    ));
    api.apply(endpoint_slice(
        "frontend-svc",
        "frontend-svc-def34",
        "IPv4",
        &HTTP,
        &[
            Endpoint::ready(pod_ip(2), "pod-b"),
            Endpoint::not_ready(pod_ip(5), "pod-starting"),
        ],
    ));
    // Dual-stack: an IPv4 and an IPv6 slice; only the IPv4 family is programmed.
    api.apply(service(
        "dual",
        &["10.96.0.30", "fd00:10:96::30"],
        ("app", "dual"),
        &HTTP,
    ));
    api.apply(endpoint_slice(
        "dual",
        "dual-v4",
        "IPv4",
        &HTTP,
        &[Endpoint::ready(pod_ip(3), "pod-c")],
    ));
    api.apply(endpoint_slice(
        "dual",
        "dual-v6",
        "IPv6",
        &HTTP,
        &[Endpoint::ready(
            "fd00:10:244:3::2".parse::<Ipv6Addr>().unwrap(),
            "pod-c",
        )],
    ));
    // NodePort: its node frontends are the Node object's InternalIP.
    api.apply(service("web", &["10.96.0.20"], ("app", "web"), &WEB));
    api.apply(endpoint_slice(
        "web",
        "web-xyz",
        "IPv4",
        &WEB,
        &[Endpoint::ready(pod_ip(1), "pod-a")],
    ));
    api.apply(node(NODE, "192.168.50.10"));
    api.apply(node("node-2", "192.168.50.11"));
    // Owned by another proxy: ignored, with its slice.
    api.apply(with_label(
        service("other-proxy", &["10.96.0.40"], ("app", "x"), &HTTP),
        "service.kubernetes.io/service-proxy-name",
        "other",
    ));
    api.apply(with_label(
        endpoint_slice(
            "other-proxy",
            "other-proxy-1",
            "IPv4",
            &HTTP,
            &[Endpoint::ready(pod_ip(9), "x")],
        ),
        "service.kubernetes.io/service-proxy-name",
        "other",
    ));
    // Headless: no frontend.
    api.apply(service("headless", &["None"], ("app", "h"), &HTTP));
    api.apply(with_label(
        endpoint_slice(
            "headless",
            "headless-1",
            "IPv4",
            &HTTP,
            &[Endpoint::ready(pod_ip(8), "h")],
        ),
        "service.kubernetes.io/headless",
        "",
    ));
    // A slice nobody manages for a Service (no kubernetes.io/service-name label): ignored
    // even though it would add a backend to frontend-svc by name.
    let mut orphan = endpoint_slice(
        "frontend-svc",
        "orphan",
        "IPv4",
        &HTTP,
        &[Endpoint::ready(pod_ip(7), "stray")],
    );
    orphan["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("kubernetes.io/service-name");
    api.apply(orphan);
}

struct Env {
    api: FakeApi,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("svc-lb-kube-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let api = FakeApi::new();
        populate(&api);
        api.serve(TcpListener::bind("127.0.0.1:0").unwrap());
        let kubeconfig = FakeApi::write_kubeconfig(
            &dir.join("kubeconfig"),
            &format!("http://{}", api.addr()),
            &[],
        );
        Env {
            api,
            kubeconfig,
            dir,
        }
    }

    /// Watchers against this API server (reading the kubeconfig now), not yet synced.
    async fn watch(&self) -> ClusterWatch {
        let (client, _) = client(Some(&self.kubeconfig), None).await.unwrap();
        ClusterWatch::start(client, NODE)
    }

    /// [`Env::watch`] once the initial lists completed (within 5 s).
    async fn synced_watch(&self) -> ClusterWatch {
        let watch = self.watch().await;
        synced(&watch, Duration::from_secs(5)).await;
        watch
    }

    /// Scales `web` to pod-a and pod `n` and waits until `watch` sees both backends.
    async fn scale_web(&self, watch: &ClusterWatch, n: u8, pod: &str, what: &str) {
        self.api.apply(endpoint_slice(
            "web",
            "web-xyz",
            "IPv4",
            &WEB,
            &[
                Endpoint::ready(pod_ip(1), "pod-a"),
                Endpoint::ready(pod_ip(n), pod),
            ],
        ));
        until(watch, what, |d| {
            backends_of(d, "10.96.0.20:8080/TCP").len() == 2
        })
        .await;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cfg() -> TranslateConfig {
    TranslateConfig {
        node_ips: Vec::new(),
        node_name: Some(NODE.to_string()),
        nodeport_range: Default::default(),
    }
}

/// The desired state the watched objects translate to.
fn state(watch: &ClusterWatch) -> DesiredState {
    translate(&watch.objects(), &cfg()).state
}

/// frontend -> sorted backends, as strings.
fn desired(watch: &ClusterWatch) -> BTreeMap<String, Vec<String>> {
    state(watch)
        .frontends
        .values()
        .map(|f| {
            (
                f.key.to_string(),
                f.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn expected_initial() -> BTreeMap<String, Vec<String>> {
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    BTreeMap::from([
        (
            "10.96.0.10:80/TCP".into(),
            v(&["10.244.1.2:5000", "10.244.2.2:5000"]),
        ),
        ("10.96.0.20:8080/TCP".into(), v(&["10.244.1.2:80"])),
        ("192.168.50.10:30080/TCP".into(), v(&["10.244.1.2:80"])),
        ("10.96.0.30:80/TCP".into(), v(&["10.244.3.2:5000"])),
    ])
}

async fn synced(watch: &ClusterWatch, within: Duration) {
    tokio::time::timeout(within, watch.wait_synced())
        .await
        .expect("watchers did not complete their initial lists in time");
}

/// Waits (handling change notifications like the agent) until `check` holds.
async fn until(
    watch: &ClusterWatch,
    what: &str,
    mut check: impl FnMut(&BTreeMap<String, Vec<String>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = desired(watch);
        if check(&d) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: {what}; desired: {d:#?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), watch.changed()).await;
    }
}

fn backends_of(d: &BTreeMap<String, Vec<String>>, fe: &str) -> Vec<String> {
    d.get(fe).cloned().unwrap_or_default()
}

/// Polls `done` every 20 ms; fails with `what` if it does not hold within 5 s.
async fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn initial_list_builds_the_desired_state_and_follows_changes() {
    let env = Env::new("follow");
    let watch = env.synced_watch().await;
    assert_eq!(desired(&watch), expected_initial());

    // Scale up: a pod joins the second slice.
    env.api.apply(endpoint_slice(
        "frontend-svc",
        "frontend-svc-def34",
        "IPv4",
        &HTTP,
        &[
            Endpoint::ready(pod_ip(2), "pod-b"),
            Endpoint::ready(pod_ip(5), "pod-starting"),
        ],
    ));
    until(&watch, "pod 5 joins frontend-svc", |d| {
        backends_of(d, "10.96.0.10:80/TCP").contains(&"10.244.5.2:5000".to_string())
    })
    .await;
    // Scale down to zero ready: the terminating endpoint is used (KEP-1669 fallback).
    env.api
        .delete("EndpointSlice", Some("default"), "frontend-svc-def34");
    env.api.apply(endpoint_slice(
        "frontend-svc",
        "frontend-svc-abc12",
        "IPv4",
        &HTTP,
        &[Endpoint::terminating(pod_ip(4), "pod-old")],
    ));
    until(&watch, "only the terminating endpoint is left", |d| {
        backends_of(d, "10.96.0.10:80/TCP") == ["10.244.4.2:5000"]
    })
    .await;
    // The Service is deleted: its frontend goes.
    env.api.delete("Service", Some("default"), "frontend-svc");
    until(&watch, "frontend-svc deleted", |d| {
        !d.contains_key("10.96.0.10:80/TCP")
    })
    .await;
    // The Service gets claimed by another proxy: the watch's selector drops it (DELETED).
    env.api.apply(with_label(
        service(
            "dual",
            &["10.96.0.30", "fd00:10:96::30"],
            ("app", "dual"),
            &HTTP,
        ),
        "service.kubernetes.io/service-proxy-name",
        "other",
    ));
    until(&watch, "dual handed to another proxy", |d| {
        !d.contains_key("10.96.0.30:80/TCP")
    })
    .await;
    // This node's address changes: NodePort frontends move; node-2's changes do not matter.
    env.api.apply(node(NODE, "192.168.50.20"));
    env.api.apply(node("node-2", "192.168.50.99"));
    until(&watch, "NodePort on the new node address", |d| {
        d.contains_key("192.168.50.20:30080/TCP") && !d.contains_key("192.168.50.10:30080/TCP")
    })
    .await;
    assert!(!desired(&watch).contains_key("192.168.50.99:30080/TCP"));
    assert_eq!(watch.objects().nodes.len(), 1);

    // What the agent asked for is exactly what its RBAC grants (API_ACCESS x READ_VERBS), with
    // kube-proxy's selectors.
    let reqs = env.api.requests();
    for r in &reqs {
        let res = r.res.unwrap_or_else(|| panic!("unexpected request {r:?}"));
        assert_eq!(r.method, "GET", "{r:?}");
        let verb = if r.is_watch() { "watch" } else { "list" };
        assert!(READ_VERBS.contains(&verb));
        let (group, resource) = res.rbac();
        assert!(
            API_ACCESS
                .iter()
                .any(|a| a.group == group && a.resource == resource),
            "{r:?}"
        );
        let sel = |k: &str| r.query.get(k).map(String::as_str);
        match res {
            Res::Services => assert_eq!(
                sel("labelSelector"),
                Some("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
            ),
            Res::EndpointSlices => assert_eq!(
                sel("labelSelector"),
                Some(
                    "kubernetes.io/service-name,!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
                )
            ),
            Res::Nodes => assert_eq!(sel("fieldSelector"), Some("metadata.name=node-1")),
        }
        if r.is_watch() {
            assert_eq!(sel("allowWatchBookmarks"), Some("true"), "{r:?}");
        }
    }
    for res in Res::ALL {
        assert!(
            reqs.iter().any(|r| r.res == Some(res) && r.is_watch()),
            "{res:?} never watched"
        );
        assert_eq!(env.api.lists(res), 1, "{res:?} listed more than once");
    }
}

#[tokio::test]
async fn gone_410_relists_and_dropped_watches_resume_without_relisting() {
    let env = Env::new("relist");
    let watch = env.synced_watch().await;

    // Connection cut: the watchers resume from their resourceVersion; a change made while
    // they were disconnected arrives through the resumed watch, without a new list.
    env.api.drop_watches();
    env.scale_web(&watch, 2, "pod-b", "web scaled to 2 after a dropped watch")
        .await;
    for res in Res::ALL {
        assert_eq!(
            env.api.lists(res),
            1,
            "{res:?} re-listed after a plain drop"
        );
    }

    // Bookmarks: the Service watcher saw no Service event for a while, but a BOOKMARK moves
    // its resourceVersion forward, so after compaction it can still resume without a list.
    env.api.bookmark();
    poll("bookmarks not sent on every watch", || {
        env.api.bookmarks_sent() >= Res::ALL.len()
    })
    .await;
    // Written to the sockets; give the watchers a moment to read them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.api.compact();
    env.api.drop_watches();
    env.api
        .apply(service("late", &["10.96.0.50"], ("app", "late"), &HTTP));
    until(&watch, "Service added after bookmark+compaction", |d| {
        d.contains_key("10.96.0.50:80/TCP")
    })
    .await;
    assert_eq!(env.api.lists(Res::Services), 1, "bookmark was not used");

    // 410 Gone with compacted history: every watcher re-lists. A deletion that happened while
    // they were cut off must be noticed from the new list alone (no DELETED event is replayed).
    env.api.expire_watches();
    env.api.delete("Service", Some("default"), "web");
    env.api.compact();
    until(&watch, "web gone after the re-list", |d| {
        !d.contains_key("10.96.0.20:8080/TCP")
    })
    .await;
    for res in Res::ALL {
        poll(&format!("{res:?} never re-listed after 410"), || {
            env.api.lists(res) >= 2
        })
        .await;
    }
    assert!(desired(&watch).contains_key("10.96.0.10:80/TCP"));
}

#[tokio::test]
async fn unreachable_api_server_is_waited_for() {
    let dir = std::env::temp_dir().join(format!("svc-lb-kube-late-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Reserve a port, release it: nothing listens there until the server comes up.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The current context points at a dead address; `--context live` selects the right one.
    let kubeconfig = FakeApi::write_kubeconfig(
        &dir.join("kubeconfig"),
        "http://127.0.0.1:9",
        &[("live", &format!("http://127.0.0.1:{port}"))],
    );
    let (client, info) = client(Some(&kubeconfig), Some("live")).await.unwrap();
    assert_eq!(info.server, format!("http://127.0.0.1:{port}/"));
    let watch = ClusterWatch::start(client, NODE);
    assert!(
        tokio::time::timeout(Duration::from_millis(1200), watch.wait_synced())
            .await
            .is_err(),
        "synced without an API server"
    );
    let api = FakeApi::new();
    populate(&api);
    api.serve(TcpListener::bind(("127.0.0.1", port)).unwrap());
    synced(&watch, Duration::from_secs(10)).await;
    assert_eq!(desired(&watch), expected_initial());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn wrong_token_never_syncs() {
    let env = Env::new("auth");
    let text = std::fs::read_to_string(&env.kubeconfig).unwrap();
    std::fs::write(&env.kubeconfig, text.replace("svc-lb-test-token", "wrong")).unwrap();
    let watch = env.watch().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(800), watch.wait_synced())
            .await
            .is_err()
    );
    assert!(env.api.requests().iter().all(|r| !r.is_watch()));
}

#[tokio::test]
async fn one_slice_change_rewrites_only_its_services_entries() {
    let env = Env::new("incr");
    let watch = env.synced_watch().await;
    let mut maps = FakeLbMaps::default();
    let first = state(&watch);
    // Full reconciles each time: what a restarted agent writes for the new objects.
    let mut rec = Reconciler::new(Limits::default());
    rec.full(&mut maps, &first).unwrap();
    let before = maps.state.clone();

    env.scale_web(&watch, 6, "pod-new", "web scaled").await;
    let second = state(&watch);
    let outcome = rec.full(&mut maps, &second).unwrap();
    assert!(outcome.ops > 0);
    // web's frontends are its ClusterIP and its NodePort on the node address.
    let web =
        |ip: Ipv4Addr| ip == Ipv4Addr::new(10, 96, 0, 20) || ip == Ipv4Addr::new(192, 168, 50, 10);
    let others = |s: &svc_lb::maps::MapState| {
        s.services
            .iter()
            .filter(|(k, _)| !web(k.ip()))
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        others(&before),
        others(&maps.state),
        "other Services' slots changed"
    );
    assert_eq!(before.revnat, maps.state.revnat, "rev-NAT entries changed");
    assert!(
        maps.state.backends.values().any(|b| b.ip() == pod_ip(6)),
        "new backend not programmed"
    );
    // Nothing changed in the cluster: nothing to write.
    let again = rec.full(&mut maps, &second).unwrap();
    assert_eq!(again.ops, 0);
}
