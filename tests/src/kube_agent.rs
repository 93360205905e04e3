//! The real `svc-lb run` agent in API mode inside a test topology's node namespace, talking to
//! a [`FakeApi`] that listens on 127.0.0.1 inside that same namespace (so nothing listens on a
//! root-namespace address and parallel tests never share a port).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{bin_path, ensure_bpffs, kube_api::FakeApi, netns::Topology};

/// Where the fake API server listens inside the node namespace.
pub const API_ADDR: &str = "127.0.0.1:6443";
/// The agent's default health address (kube-proxy's healthz port), inside the node namespace.
pub const HEALTH_ADDR: &str = "127.0.0.1:10256";
/// The Node object name the agent is told it runs on.
pub const NODE_NAME: &str = "node-1";

/// Binds [`API_ADDR`] in the node namespace and serves `api` there.
pub fn serve_in_node(topo: &Topology, api: &FakeApi) {
    let listener = topo
        .node
        .in_ns(|| TcpListener::bind(API_ADDR))
        .unwrap_or_else(|e| panic!("bind {API_ADDR} in the node netns: {e}"));
    api.serve(listener);
}

/// A running API-mode agent. Drop stops it and uninstalls its pins; a failing test prints the
/// agent log.
pub struct KubeAgent<'t> {
    topo: &'t Topology,
    bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub pin_dir: PathBuf,
    extra: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl<'t> KubeAgent<'t> {
    /// Writes a kubeconfig for [`API_ADDR`] and starts `svc-lb run` (API mode) on every node
    /// interface of `topo`, with `extra` arguments.
    pub fn start(topo: &'t Topology, extra: &[&str]) -> KubeAgent<'t> {
        ensure_bpffs();
        let kubeconfig = FakeApi::write_kubeconfig(
            &topo.dir.join("kubeconfig"),
            &format!("http://{API_ADDR}"),
            &[],
        );
        let mut agent = KubeAgent {
            topo,
            bin: bin_path("svc-lb", "SVC_LB_BIN"),
            kubeconfig,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: topo.dir.join("agent.log"),
            child: None,
            starts: 0,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", NODE_NAME])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.extra)
            // Not inherited from the test's environment.
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG");
        for iface in self.topo.node_ifaces() {
            cmd.args(["--iface", &iface]);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,svc_lb=debug");
        }
        self.topo.node.enter(&mut cmd);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log fd");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display())),
        );
    }

    /// Panics (with the log) if the agent exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "svc-lb run exited early ({status}); log:\n{}",
                self.log_text()
            );
        }
    }

    /// `kill -9`: pinned programs and maps stay.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same arguments and pin directory.
    pub fn restart(&mut self) {
        self.kill_hard();
        self.spawn();
    }

    /// SIGTERM, up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs `svc-lb <args> --pin-dir <pin_dir>` in the node namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--pin-dir").arg(&self.pin_dir);
        self.topo.node.enter(&mut cmd);
        cmd.output()
            .unwrap_or_else(|e| panic!("run svc-lb {}: {e}", args.join(" ")))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the agent's health endpoint; the HTTP status code, None if unreachable.
    pub fn health(&self, path: &str) -> Option<u16> {
        let addr: SocketAddr = HEALTH_ADDR.parse().unwrap();
        let mut conn = self
            .topo
            .node
            .in_ns(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
        let mut out = String::new();
        conn.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for KubeAgent<'_> {
    fn drop(&mut self) {
        let failing = thread::panicking();
        self.stop();
        if self.pin_dir.exists() {
            let out = self.cli(&["uninstall"]);
            if !out.status.success() {
                eprintln!(
                    "warning: svc-lb uninstall --pin-dir {} failed: {}",
                    self.pin_dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if self.pin_dir.exists() {
                let _ = fs::remove_dir_all(&self.pin_dir);
            }
        }
        if failing {
            eprintln!(
                "---- svc-lb agent log ({} start(s), {}) ----\n{}---- end of agent log ----",
                self.starts,
                self.log.display(),
                self.log_text()
            );
        }
    }
}
