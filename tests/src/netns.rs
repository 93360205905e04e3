//! Network-namespace topology for end-to-end tests (the one from `notes/common.md`):
//!
//! ```text
//! client [c0 172.31.0.2/24] <-> [n-c 172.31.0.1/24] node [n-pN 10.244.N.1/24] <-> [eth0 10.244.N.2/24] podN
//! ```
//!
//! Every namespace name carries a prefix unique to this process and test, so tests run in
//! parallel. Interface names are the fixed ones above: they live inside the test's own
//! namespaces, so they never collide. Processes are started in a namespace with `setns(2)` in
//! the forked child rather than `ip netns exec`, because `ip netns exec` also unshares the mount
//! namespace and remounts /sys: bpffs pins made there would vanish with the process, and the
//! agent's pins must outlive it.

use std::{
    fs::{self, File},
    io::{self, BufRead, BufReader},
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use crate::bin_path;

/// The client's address, and the node's address on the client link (NodePort address).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// Pod names used everywhere (demo, examples, tests).
pub const POD_NAMES: [&str; 3] = ["pod-a", "pod-b", "pod-c"];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name prefix unique within this machine for the life of the process: `slb<pid>-<n>`.
pub fn unique_prefix() -> String {
    format!(
        "slb{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`/run/netns/<name>`).
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("open netns {}: {e}", self.name))
    }

    /// Makes `cmd` enter this namespace (network only) between fork and exec.
    pub fn enter(&self, cmd: &mut Command) {
        let fd = self.open();
        // SAFETY: the closure only makes the setns syscall, which is async-signal-safe; `fd` is
        // moved into the closure and stays open until the Command is dropped.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs a command to completion in this namespace; panics with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.enter(&mut cmd);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {program} in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "`{program} {}` in netns {} failed ({}): {}{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `f` on a fresh thread that has joined this namespace. Sockets created by `f` stay in
    /// this namespace and can be used from any thread afterwards.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.open();
        let name = self.name.clone();
        thread::spawn(move || {
            // SAFETY: plain syscall on a valid fd; only this (short-lived) thread switches.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns {name}: {}", io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// One pod: its namespace, address and the node-side interface.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub node_iface: String,
}

/// The whole topology. Dropping it kills every process started through it and deletes the
/// namespaces (which also removes the veths).
pub struct Topology {
    pub prefix: String,
    pub client: Netns,
    pub node: Netns,
    pub pods: Vec<Pod>,
    /// Scratch directory for logs and manifests; removed on drop unless the test failed.
    pub dir: PathBuf,
    procs: Mutex<Vec<(String, Child)>>,
    created: Vec<Netns>,
}

/// Runs `ip <args>`, panicking with its error output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip (is iproute2 installed?): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Topology {
    /// Builds client, node and `pods` pod namespaces (at most 3: pod-a, pod-b, pod-c).
    pub fn new(pods: usize) -> Topology {
        assert!(pods <= POD_NAMES.len(), "at most {} pods", POD_NAMES.len());
        crate::require_root();
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("svc-lb-e2e-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut topo = Topology {
            client: Netns {
                name: format!("{prefix}-client"),
            },
            node: Netns {
                name: format!("{prefix}-node"),
            },
            pods: Vec::new(),
            dir,
            procs: Mutex::new(Vec::new()),
            created: Vec::new(),
            prefix,
        };
        // Push each namespace before configuring it so Drop cleans up after a partial failure.
        for ns in [topo.client.clone(), topo.node.clone()] {
            ip(&["netns", "add", &ns.name]);
            topo.created.push(ns);
        }
        let (client, node) = (topo.client.name.clone(), topo.node.name.clone());
        ip(&[
            "-n", &node, "link", "add", "n-c", "type", "veth", "peer", "name", "c0", "netns",
            &client,
        ]);
        ip(&["-n", &node, "addr", "add", "172.31.0.1/24", "dev", "n-c"]);
        ip(&["-n", &node, "link", "set", "n-c", "up"]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&["-n", &client, "addr", "add", "172.31.0.2/24", "dev", "c0"]);
        ip(&["-n", &client, "link", "set", "c0", "up"]);
        ip(&["-n", &client, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "10.96.0.0/12",
            "via",
            "172.31.0.1",
        ]);
        // Lets tests check that traffic straight to a pod (not to a Service) is untouched.
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "10.244.0.0/16",
            "via",
            "172.31.0.1",
        ]);
        let mut sysctls = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.ipv4.conf.all.rp_filter=0".to_string(),
            "net.ipv4.conf.default.rp_filter=0".to_string(),
            "net.ipv4.conf.n-c.rp_filter=0".to_string(),
        ];
        for (i, name) in POD_NAMES.iter().take(pods).enumerate() {
            let n = i + 1;
            let pod = Pod {
                name: name.to_string(),
                ns: Netns {
                    name: format!("{}-{name}", topo.prefix),
                },
                ip: Ipv4Addr::new(10, 244, n as u8, 2),
                node_iface: format!("n-p{n}"),
            };
            ip(&["netns", "add", &pod.ns.name]);
            topo.created.push(pod.ns.clone());
            let ns = pod.ns.name.as_str();
            let nif = pod.node_iface.as_str();
            ip(&[
                "-n", &node, "link", "add", nif, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("10.244.{n}.1/24"),
                "dev",
                nif,
            ]);
            ip(&["-n", &node, "link", "set", nif, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.244.{n}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{n}.1"),
            ]);
            sysctls.push(format!("net.ipv4.conf.{nif}.rp_filter=0"));
            topo.pods.push(pod);
        }
        let mut args = vec!["-q", "-w"];
        args.extend(sysctls.iter().map(String::as_str));
        topo.node.run("sysctl", &args);
        topo
    }

    /// Interfaces the agent attaches to: the client link and every pod link.
    pub fn node_ifaces(&self) -> Vec<String> {
        std::iter::once("n-c".to_string())
            .chain(self.pods.iter().map(|p| p.node_iface.clone()))
            .collect()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts `svc-lb-echo` in every pod (HTTP on 5000 and 80, UDP on 5353) and waits for each
    /// to print "ready".
    pub fn start_echo_servers(&self) {
        let bin = bin_path("svc-lb-echo", "SVC_LB_ECHO_BIN");
        for pod in &self.pods {
            let mut cmd = Command::new(&bin);
            cmd.args(["--name", &pod.name])
                .args(["--tcp", "0.0.0.0:5000", "--tcp", "0.0.0.0:80"])
                .args(["--udp", "0.0.0.0:5353"]);
            self.spawn_ready(&pod.ns, &format!("echo-{}", pod.name), cmd);
        }
    }

    /// Spawns `cmd` in `ns` (stderr to `<dir>/<label>.log`), waits up to 10 s for a line
    /// "ready" on its stdout, and keeps it until drop.
    pub fn spawn_ready(&self, ns: &Netns, label: &str, mut cmd: Command) {
        ns.enter(&mut cmd);
        let log = self.log_file(label);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.any(|l| l.is_ok_and(|l| l.trim() == "ready"));
            let _ = tx.send(ready);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let ready = rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false);
        self.procs.lock().unwrap().push((label.to_string(), child));
        assert!(
            ready,
            "{label} did not print \"ready\" within 10 s; log:\n{}",
            fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
        );
    }

    /// Creates (truncates) `<dir>/<label>.log`.
    pub fn log_file(&self, label: &str) -> File {
        let path = self.dir.join(format!("{label}.log"));
        File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in self.procs.get_mut().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.created.iter().rev() {
            let st = Command::new("ip")
                .args(["netns", "del", &ns.name])
                .stderr(Stdio::null())
                .status();
            if !matches!(st, Ok(s) if s.success()) {
                eprintln!("warning: could not delete netns {}", ns.name);
            }
        }
        if thread::panicking() {
            eprintln!("test scratch files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
