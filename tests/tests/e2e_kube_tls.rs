//! End to end: how the real agent connects to the API server (run as root, real agent in a
//! node namespace, fake API server in that namespace).
//! - Paged lists: more than one page (kube's watcher asks for 500 items a page and follows
//!   `metadata.continue`) and a continue token that expires mid-list (the agent lists again
//!   and converges).
//! - HTTPS with a bearer token like a real cluster: a kubeconfig with
//!   `certificate-authority-data` + `token`, `--context` choosing among two contexts, and a
//!   wrong CA (clear TLS error, retries, no crash; a fixed kubeconfig then works), a wrong
//!   token (401 logged, retried).
//! - In-cluster: no kubeconfig, `KUBERNETES_SERVICE_HOST/PORT` and the service account files at
//!   /var/run/secrets/kubernetes.io/serviceaccount, which only the agent sees (a tmpfs in its
//!   own private mount namespace, gone with the process).

use std::{
    ffi::OsString,
    fs,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use svc_lb_tests::{
    agent::AgentProcess,
    bin_path, ensure_bpffs,
    kube_agent::{API_ADDR, KubeAgent, NODE_NAME, serve_in_node},
    kube_api::{FakeApi, KubeContext, Pki, Res, TOKEN, write_kubeconfig_contexts},
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
fn programmed(agent: &AgentProcess<'_>) -> usize {
    count_programmed(agent.cli(&["debug", "services", "-o", "json"]))
}

fn count_programmed(out: Output) -> usize {
    if !out.status.success() {
        return 0;
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("debug services JSON");
    rows.iter()
        .filter(|r| r["backends"].as_array().is_some_and(|b| !b.is_empty()))
        .count()
}

fn wait_programmed(agent: &mut AgentProcess<'_>, want: usize) {
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

/// Serves `api` over HTTPS at [`API_ADDR`] in the node namespace, with a certificate for
/// 127.0.0.1 from a new test CA (returned).
fn serve_tls_in_node(topo: &Topology, api: &FakeApi) -> Pki {
    let pki = Pki::new(Ipv4Addr::LOCALHOST.into());
    let listener = topo
        .node
        .in_ns(|| TcpListener::bind(API_ADDR))
        .unwrap_or_else(|e| panic!("bind {API_ADDR} in the node netns: {e}"));
    api.serve_tls(listener, &pki);
    pki
}

fn https() -> String {
    format!("https://{API_ADDR}")
}

/// `svc-lb run --kubeconfig <kc> --node-name node-1 --node-ip 10.244.1.1 <extra>`.
fn start_agent<'t>(topo: &'t Topology, kubeconfig: &PathBuf, extra: &[&str]) -> AgentProcess<'t> {
    let mut args: Vec<OsString> = vec![
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--node-name".into(),
        NODE_NAME.into(),
        "--node-ip".into(),
        "10.244.1.1".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    AgentProcess::start(topo, args)
}

#[test]
fn https_with_ca_data_and_token_and_context_choice() {
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, 3);
    let pki = serve_tls_in_node(&topo, &api);
    let other = Pki::new(Ipv4Addr::LOCALHOST.into());
    let server = https();
    // The current context trusts another CA and has a wrong token; --context picks the good one.
    let kc = write_kubeconfig_contexts(
        &topo.dir.join("kubeconfig"),
        &[
            KubeContext {
                name: "staging",
                server: &server,
                ca_pem: Some(&other.ca_pem),
                token: "not-the-token",
            },
            KubeContext {
                name: "prod",
                server: &server,
                ca_pem: Some(&pki.ca_pem),
                token: TOKEN,
            },
        ],
    );
    let mut agent = start_agent(&topo, &kc, &["--context", "prod"]);
    wait_programmed(&mut agent, 3);
    let log = agent.log_text();
    assert!(log.contains("server=https://127.0.0.1:6443/"), "{log}");
    // Every request was authenticated (the server answers 401 otherwise, nothing would list).
    assert!(api.lists(Res::Services) >= 1);
    add_service(&api, 3, topo.pod("pod-a").ip);
    wait_programmed(&mut agent, 4);
}

#[test]
fn wrong_ca_is_a_clear_tls_error_retried_until_a_fixed_kubeconfig() {
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, 3);
    let pki = serve_tls_in_node(&topo, &api);
    let wrong = Pki::new(Ipv4Addr::LOCALHOST.into());
    let server = https();
    let path = topo.dir.join("kubeconfig");
    let context = |ca: &str| {
        write_kubeconfig_contexts(
            &path,
            &[KubeContext {
                name: "cluster",
                server: &server,
                ca_pem: Some(ca),
                token: TOKEN,
            }],
        )
    };
    let kc = context(&wrong.ca_pem);
    let mut agent = start_agent(&topo, &kc, &[]);
    let tls_error = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("invalid peer certificate"))
            .count()
    };
    wait_for(
        "a TLS certificate error in the agent log",
        Duration::from_secs(15),
        || {
            agent.assert_running();
            (tls_error(&agent.log_text()) > 0).then_some(())
        },
    );
    // It keeps retrying (with backoff, logged again at debug) and does not exit.
    let attempts = |log: &str| log.matches("invalid peer certificate").count();
    let (before, tried) = (api.requests().len(), attempts(&agent.log_text()));
    thread::sleep(Duration::from_secs(3));
    agent.assert_running();
    assert!(attempts(&agent.log_text()) > tried, "no retry in 3 s");
    assert_eq!(api.requests().len(), before, "no request gets past TLS");
    assert_eq!(programmed(&agent), 0);
    // Both CAs have the same name, so rustls reports the signature (BadSignature); every
    // watcher says so.
    let log = agent.log_text();
    for res in ["services", "endpointslices", "nodes"] {
        assert!(
            log.lines().any(|l| l.contains("invalid peer certificate")
                && l.contains(&format!("resource=\"{res}\""))),
            "{res}: {log}"
        );
    }

    // The fixed kubeconfig (right CA) works after a restart.
    context(&pki.ca_pem);
    agent.restart();
    wait_programmed(&mut agent, 3);
}

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Runs in the agent's new private mount namespace (util-linux `unshare`) before exec'ing the
/// agent: a scratch tmpfs on /run (so the mount point is not created on the host), then the
/// service account tmpfs, read-only like the kubelet's projected volume.
const IN_POD: &str = r#"staging=$1; shift
mount -t tmpfs -o mode=755,size=1m svc-lb-test-run /run
mkdir -p /var/run/secrets/kubernetes.io/serviceaccount
mount -t tmpfs -o mode=755,size=1m svc-lb-test-sa /var/run/secrets/kubernetes.io/serviceaccount
cp "$staging/token" "$staging/ca.crt" "$staging/namespace" /var/run/secrets/kubernetes.io/serviceaccount/
mount -o remount,ro /var/run/secrets/kubernetes.io/serviceaccount
exec "$@""#;

/// The agent as a pod runs it: no kubeconfig anywhere (empty HOME, no KUBECONFIG), the
/// in-cluster environment variables, and the service account files in its own mount
/// namespace. Drop stops it and uninstalls its pins; the mount namespace dies with it.
struct PodAgent<'t> {
    topo: &'t Topology,
    bin: PathBuf,
    pin_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl<'t> PodAgent<'t> {
    fn start(topo: &'t Topology, token: &str, ca_pem: &str) -> PodAgent<'t> {
        ensure_bpffs();
        let staging = topo.dir.join("serviceaccount");
        let home = topo.dir.join("home");
        for d in [&staging, &home] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        for (file, text) in [
            ("token", token),
            ("ca.crt", ca_pem),
            ("namespace", "kube-system"),
        ] {
            fs::write(staging.join(file), text).expect("write service account file");
        }
        let bin = bin_path("svc-lb", "SVC_LB_BIN");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
        let log = topo.dir.join("agent.log");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-eu",
            "-c",
        ])
        .arg(IN_POD)
        .arg("sh")
        .arg(&staging)
        .arg(&bin)
        .args(["run", "--node-name", NODE_NAME, "--node-ip", "10.244.1.1"])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--no-socket-lb");
        for iface in topo.node_ifaces() {
            cmd.args(["--iface", &iface]);
        }
        let (host, port) = API_ADDR.split_once(':').unwrap();
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("KUBERNETES_SERVICE_HOST", host)
            .env("KUBERNETES_SERVICE_PORT", port)
            .env("RUST_LOG", "info,svc_lb=debug");
        topo.node.enter(&mut cmd);
        let out = fs::File::create(&log).expect("agent log");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out);
        let child = cmd.spawn().expect("spawn unshare (util-linux)");
        PodAgent {
            topo,
            bin,
            pin_dir,
            log,
            child: Some(child),
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            panic!("agent exited ({status}); log:\n{}", self.log_text());
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--pin-dir").arg(&self.pin_dir);
        self.topo.node.enter(&mut cmd);
        cmd.output().expect("run svc-lb")
    }
}

impl Drop for PodAgent<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid (the agent: unshare and sh exec into it).
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.pin_dir.exists() {
            let _ = self.cli(&["uninstall"]);
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        if thread::panicking() {
            eprintln!("---- in-cluster agent log ----\n{}", self.log_text());
        }
    }
}

#[test]
fn in_cluster_service_account_without_kubeconfig() {
    let host_had_sa = Path::new(SA_DIR).exists();
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, 3);
    let pki = serve_tls_in_node(&topo, &api);
    {
        let mut agent = PodAgent::start(&topo, TOKEN, &pki.ca_pem);
        wait_for(
            "3 Services with backends (in-cluster config)",
            Duration::from_secs(30),
            || {
                agent.assert_running();
                (count_programmed(agent.cli(&["debug", "services", "-o", "json"])) == 3)
                    .then_some(())
            },
        );
        let log = agent.log_text();
        assert!(
            log.contains("server=https://127.0.0.1:6443/")
                && log.contains("config=in-cluster service account"),
            "{log}"
        );
        // The token came from the mounted file (the server answers 401 to anything else).
        let authed = api.requests().len();
        assert!(authed >= 3, "{authed} requests");
        // The service account mount is the agent's alone.
        if !host_had_sa {
            assert!(!Path::new(SA_DIR).exists(), "{SA_DIR} leaked to the host");
        }
        add_service(&api, 3, topo.pod("pod-a").ip);
        wait_for("the 4th Service", Duration::from_secs(15), || {
            agent.assert_running();
            (count_programmed(agent.cli(&["debug", "services", "-o", "json"])) == 4).then_some(())
        });
    }
    if !host_had_sa {
        assert!(!Path::new(SA_DIR).exists());
    }
}

#[test]
fn wrong_token_is_a_logged_401_retried_without_exiting() {
    let topo = Topology::new(1);
    let api = bulk_cluster(&topo, 3);
    let pki = serve_tls_in_node(&topo, &api);
    let server = https();
    let kc = write_kubeconfig_contexts(
        &topo.dir.join("kubeconfig"),
        &[KubeContext {
            name: "cluster",
            server: &server,
            ca_pem: Some(&pki.ca_pem),
            token: "expired-token",
        }],
    );
    let mut agent = start_agent(&topo, &kc, &[]);
    let unauthorized = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("Unauthorized") && l.contains("code: 401"))
            .count()
    };
    wait_for(
        "401 Unauthorized in the agent log",
        Duration::from_secs(15),
        || {
            agent.assert_running();
            (unauthorized(&agent.log_text()) > 0).then_some(())
        },
    );
    // TLS worked (the requests reached the server), authentication did not; it retries.
    let lists = api.lists(Res::Services);
    assert!(lists >= 1);
    wait_for("a retried list", Duration::from_secs(10), || {
        agent.assert_running();
        (api.lists(Res::Services) > lists).then_some(())
    });
    assert_eq!(programmed(&agent), 0);
}
