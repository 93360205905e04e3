//! Helpers for svc-lb's privileged tests: network-namespace topologies, the real agent as a
//! child process, Kubernetes manifests and a small traffic client.
//!
//! These tests need root. They never skip: when they cannot run they fail with the reason.

pub mod agent;
pub mod browser;
pub mod cgroup;
pub mod client;
pub mod container;
pub mod kube_agent;
pub mod kube_api;
pub mod kube_objects;
pub mod manifests;
pub mod multinode;
pub mod netns;
pub mod packet;
pub mod prog;
pub mod views;

use std::{
    fs,
    path::PathBuf,
    process::Command,
    sync::Once,
    thread,
    time::{Duration, Instant},
};

/// Panics unless running as root (namespaces, BPF and bpffs all need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF): run them as root"
    );
}

/// Finds a binary of this workspace: `$<env>` if set, otherwise next to the test executable's
/// directory (`target/<profile>/<name>`, the test itself lives in `target/<profile>/deps`).
pub fn bin_path(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found ({env} unset); build it first: cargo build --bins",
        path.display()
    );
    path
}

/// Mounts bpffs on /sys/fs/bpf once per process if it is not mounted yet. Doing it here, before
/// any agent starts, avoids parallel agents racing to mount it (which would stack two mounts and
/// hide one agent's pins). Under `cargo xtask test` the tests run in a private mount namespace
/// where /sys/fs/bpf starts unmounted (a fresh machine), so the first test binary mounts it
/// there and it vanishes with the run.
pub fn ensure_bpffs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if bpffs_mounted() {
            return;
        }
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t bpf bpf /sys/fs/bpf failed: {st}");
        assert!(bpffs_mounted(), "bpffs still not mounted on /sys/fs/bpf");
        eprintln!("svc-lb-tests: mounted bpffs on /sys/fs/bpf");
    });
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Field 5 is the mount point; the fs type follows the "-" separator.
            f.get(4) == Some(&"/sys/fs/bpf")
                && f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1)) == Some(&"bpf")
        })
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Client-side checks shared by the end-to-end tests.
pub mod fixture {
    use std::{net::SocketAddr, time::Duration};

    use crate::{
        agent::AgentGuard,
        client,
        manifests::{self, FRONTEND_VIP, ManifestDir},
        netns::Topology,
    };

    /// Topology with 3 pods running echo servers, and a manifests dir holding the standard
    /// Services (`services.yaml`) and Pods (`pods.yaml`).
    pub fn standard() -> (Topology, ManifestDir) {
        let topo = Topology::new(3);
        topo.start_echo_servers();
        let dir = ManifestDir::new(&topo.dir);
        let pods: Vec<_> = topo.pods.iter().collect();
        dir.write("services.yaml", &manifests::standard(&pods));
        dir.write("pods.yaml", &manifests::pods(&pods));
        (topo, dir)
    }

    pub fn frontend() -> SocketAddr {
        SocketAddr::from((FRONTEND_VIP, 80))
    }

    /// Waits (up to 20 s) until a new connection to frontend-svc gets an answer, failing early
    /// if the agent exits.
    pub fn wait_serving(topo: &Topology, agent: &mut AgentGuard<'_>) {
        crate::wait_for(
            "frontend-svc 10.96.0.10:80 to answer through svc-lb",
            Duration::from_secs(20),
            || {
                agent.assert_running();
                client::http_get_within(&topo.client, frontend(), Duration::from_millis(300)).ok()
            },
        );
    }
}
