//! Two-node topology for multi-node tests, one `svc-lb run` agent per node:
//!
//! ```text
//! client-a [c0 172.31.0.2/24 + .3] <-> [n-c 172.31.0.1/24] node-a [n-link 172.30.0.1/24] <-> [n-link 172.30.0.2/24] node-b [n-c 172.32.0.1/24] <-> [c0 172.32.0.2/24] client-b
//!                                      node-a [n-p1 10.244.1.1/24] <-> pod-a 10.244.1.2      node-b [n-p2 10.244.2.1/24] <-> pod-b 10.244.2.2
//! ```
//!
//! Each node routes the other's pod CIDR over the node link. Node B has no route to client-a's
//! subnet: a pod on node B can only answer client-a through node A, which is what SNAT to node
//! A's address achieves. Node objects (`node-a`: InternalIP 172.30.0.1, `node-b`: 172.30.0.2)
//! and EndpointSlices with `nodeName` come from the same manifests for both agents.
//!
//! [`RoutedNs`] is a smaller namespace for program tests that need a route (the datapath asks
//! the FIB for the SNAT source address).

use std::{
    ffi::OsString,
    fs,
    io::{self, BufRead, BufReader, Write},
    mem,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::Duration,
};

use crate::{
    bin_path, ensure_bpffs,
    netns::{Netns, ip, unique_prefix},
};

pub const CLIENT_A_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
/// A second address on client-a: "another client" using the same source port.
pub const CLIENT_A2_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 3);
pub const CLIENT_B_IP: Ipv4Addr = Ipv4Addr::new(172, 32, 0, 2);
/// The NodePort address each client uses (the node's address on the client link).
pub const NODE_A_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
pub const NODE_B_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 32, 0, 1);
/// The nodes' InternalIPs (on the node link), the address SNATed flows come from.
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
pub const POD_A_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

/// Namespaces deleted (in reverse order) on drop.
struct Namespaces(Vec<Netns>);

impl Namespaces {
    fn add(&mut self, name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        self.0.push(ns.clone());
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            let st = Command::new("ip")
                .args(["netns", "del", &ns.name])
                .stderr(Stdio::null())
                .status();
            if !matches!(st, Ok(s) if s.success()) {
                eprintln!("warning: could not delete netns {}", ns.name);
            }
        }
    }
}

/// A namespace with forwarding on, `r0` 172.30.0.1/24 (a veth whose peer `r1` is up in the
/// same namespace) and a route to 10.244.2.0/24 over `r0`: a FIB lookup towards a pod there
/// gives 172.30.0.1 as the source. Deleted on drop.
pub struct RoutedNs {
    pub ns: Netns,
    _owned: Namespaces,
}

impl RoutedNs {
    pub fn create() -> RoutedNs {
        crate::require_root();
        let mut owned = Namespaces(Vec::new());
        let ns = owned.add(format!("{}-routed", unique_prefix()));
        let n = ns.name.as_str();
        ip(&[
            "-n", n, "link", "add", "r0", "type", "veth", "peer", "name", "r1",
        ]);
        ip(&["-n", n, "addr", "add", "172.30.0.1/24", "dev", "r0"]);
        for dev in ["lo", "r0", "r1"] {
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        ip(&["-n", n, "route", "add", "10.244.2.0/24", "dev", "r0"]);
        ns.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        RoutedNs { ns, _owned: owned }
    }
}

/// One node namespace and what its agent needs.
#[derive(Debug, Clone)]
pub struct Node {
    /// The Node object's name, passed as `--node-name`.
    pub name: &'static str,
    pub ns: Netns,
    /// InternalIP (node link).
    pub ip: Ipv4Addr,
    /// NodePort address on the client link, passed as `--node-ip`.
    pub client_ip: Ipv4Addr,
    /// Interfaces the agent attaches to.
    pub ifaces: Vec<&'static str>,
}

/// A pod: a namespace with `eth0` behind one node.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: &'static str,
    pub node: &'static str,
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

/// The two-node topology (see the module docs). Drop stops the servers started through it and
/// deletes every namespace.
pub struct Cluster {
    pub prefix: String,
    pub client_a: Netns,
    pub client_b: Netns,
    pub nodes: [Node; 2],
    pub pods: [Pod; 2],
    /// Scratch directory (manifests, agent logs); kept when the test fails.
    pub dir: PathBuf,
    stop: Mutex<Vec<TcpListener>>,
    stop_udp: Mutex<Vec<UdpSocket>>,
    // Last: namespaces go after everything that runs in them.
    _owned: Namespaces,
}

impl Cluster {
    pub fn create() -> Cluster {
        crate::require_root();
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("svc-lb-e2e-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut owned = Namespaces(Vec::new());
        let client_a = owned.add(format!("{prefix}-ca"));
        let client_b = owned.add(format!("{prefix}-cb"));
        let node_a = owned.add(format!("{prefix}-na"));
        let node_b = owned.add(format!("{prefix}-nb"));
        let pod_a = owned.add(format!("{prefix}-pa"));
        let pod_b = owned.add(format!("{prefix}-pb"));
        let (ca, cb, na, nb) = (
            client_a.name.as_str(),
            client_b.name.as_str(),
            node_a.name.as_str(),
            node_b.name.as_str(),
        );

        // Clients.
        let link = |node: &str, nif: &str, peer_ns: &str, pif: &str| {
            ip(&[
                "-n", node, "link", "add", nif, "type", "veth", "peer", "name", pif, "netns",
                peer_ns,
            ]);
        };
        link(na, "n-c", ca, "c0");
        link(nb, "n-c", cb, "c0");
        ip(&["-n", na, "addr", "add", "172.31.0.1/24", "dev", "n-c"]);
        ip(&["-n", ca, "addr", "add", "172.31.0.2/24", "dev", "c0"]);
        ip(&["-n", ca, "addr", "add", "172.31.0.3/24", "dev", "c0"]);
        ip(&["-n", nb, "addr", "add", "172.32.0.1/24", "dev", "n-c"]);
        ip(&["-n", cb, "addr", "add", "172.32.0.2/24", "dev", "c0"]);
        // Node link.
        link(na, "n-link", nb, "n-link");
        ip(&["-n", na, "addr", "add", "172.30.0.1/24", "dev", "n-link"]);
        ip(&["-n", nb, "addr", "add", "172.30.0.2/24", "dev", "n-link"]);
        // Pods.
        link(na, "n-p1", &pod_a.name, "eth0");
        link(nb, "n-p2", &pod_b.name, "eth0");
        ip(&["-n", na, "addr", "add", "10.244.1.1/24", "dev", "n-p1"]);
        ip(&["-n", nb, "addr", "add", "10.244.2.1/24", "dev", "n-p2"]);
        ip(&[
            "-n",
            &pod_a.name,
            "addr",
            "add",
            "10.244.1.2/24",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &pod_b.name,
            "addr",
            "add",
            "10.244.2.2/24",
            "dev",
            "eth0",
        ]);
        for (ns, devs) in [
            (ca, &["lo", "c0"][..]),
            (cb, &["lo", "c0"][..]),
            (na, &["lo", "n-c", "n-link", "n-p1"][..]),
            (nb, &["lo", "n-c", "n-link", "n-p2"][..]),
            (pod_a.name.as_str(), &["lo", "eth0"][..]),
            (pod_b.name.as_str(), &["lo", "eth0"][..]),
        ] {
            for dev in devs {
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
        }
        ip(&["-n", ca, "route", "add", "default", "via", "172.31.0.1"]);
        ip(&["-n", cb, "route", "add", "default", "via", "172.32.0.1"]);
        ip(&[
            "-n",
            &pod_a.name,
            "route",
            "add",
            "default",
            "via",
            "10.244.1.1",
        ]);
        ip(&[
            "-n",
            &pod_b.name,
            "route",
            "add",
            "default",
            "via",
            "10.244.2.1",
        ]);
        // Pod CIDRs of the other node over the node link; no route to the other node's clients.
        ip(&[
            "-n",
            na,
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "172.30.0.2",
        ]);
        ip(&[
            "-n",
            nb,
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "172.30.0.1",
        ]);
        for ns in [&node_a, &node_b] {
            ns.run(
                "sysctl",
                &[
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            );
        }

        Cluster {
            client_a,
            client_b,
            nodes: [
                Node {
                    name: "node-a",
                    ns: node_a,
                    ip: NODE_A_IP,
                    client_ip: NODE_A_CLIENT_IP,
                    ifaces: vec!["n-c", "n-link", "n-p1"],
                },
                Node {
                    name: "node-b",
                    ns: node_b,
                    ip: NODE_B_IP,
                    client_ip: NODE_B_CLIENT_IP,
                    ifaces: vec!["n-c", "n-link", "n-p2"],
                },
            ],
            pods: [
                Pod {
                    name: "pod-a",
                    node: "node-a",
                    ns: pod_a,
                    ip: POD_A_IP,
                },
                Pod {
                    name: "pod-b",
                    node: "node-b",
                    ns: pod_b,
                    ip: POD_B_IP,
                },
            ],
            dir,
            stop: Mutex::new(Vec::new()),
            stop_udp: Mutex::new(Vec::new()),
            _owned: owned,
            prefix,
        }
    }

    /// Starts a TCP and a UDP server on `port` in every pod. Each accepted TCP connection
    /// first gets a line `<pod name> <peer address:port>` (the source the pod sees), then every
    /// line it sends is echoed back, until it closes. Each datagram is answered with that line.
    pub fn start_peer_servers(&self, port: u16) {
        for pod in &self.pods {
            let socket = pod
                .ns
                .in_ns(move || UdpSocket::bind(("0.0.0.0", port)))
                .unwrap_or_else(|e| panic!("bind udp {port} in {}: {e}", pod.name));
            let recv = socket.try_clone().expect("clone udp socket");
            let name = pod.name;
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                // Ends when Drop shuts the socket down (recv fails or returns nothing).
                while let Ok((n, peer)) = recv.recv_from(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let _ = recv.send_to(format!("{name} {peer}\n").as_bytes(), peer);
                }
            });
            self.stop_udp.lock().unwrap().push(socket);
        }
        for pod in &self.pods {
            let listener = pod
                .ns
                .in_ns(move || TcpListener::bind(("0.0.0.0", port)))
                .unwrap_or_else(|e| panic!("bind {port} in {}: {e}", pod.name));
            let accept = listener.try_clone().expect("clone listener");
            let name = pod.name;
            thread::spawn(move || {
                for conn in accept.incoming() {
                    let Ok(conn) = conn else { return };
                    thread::spawn(move || serve_peer(conn, name));
                }
            });
            self.stop.lock().unwrap().push(listener);
        }
    }

    /// Node objects, as the API server serves them: InternalIP on the node link.
    pub fn node_manifests(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n\
                     \x20 - type: InternalIP\n    address: {}\n  - type: Hostname\n    address: {}\n",
                    n.name, n.ip, n.name
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Wake the accept loops so their threads end: shutting a listening socket down makes
        // accept() fail.
        let listeners = self.stop.get_mut().unwrap().drain(..);
        let fds: Vec<OwnedFd> = listeners
            .map(OwnedFd::from)
            .chain(
                self.stop_udp
                    .get_mut()
                    .unwrap()
                    .drain(..)
                    .map(OwnedFd::from),
            )
            .collect();
        for fd in &fds {
            // SAFETY: shutdown(2) on a socket we own.
            unsafe {
                libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        if thread::panicking() {
            eprintln!("test scratch files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn serve_peer(conn: TcpStream, name: &str) {
    let Ok(peer) = conn.peer_addr() else { return };
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    if writeln!(writer, "{name} {peer}").is_err() {
        return;
    }
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

/// A connection to a [`Cluster::start_peer_servers`] server.
pub struct PeerConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The pod that answered.
    pub pod: String,
    /// The source address the pod saw.
    pub seen_from: SocketAddr,
}

impl PeerConn {
    /// Connects from `ns` (from `src` if given, else any address and port) and reads the
    /// greeting.
    pub fn connect(
        ns: &Netns,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> io::Result<PeerConn> {
        let stream = ns.in_ns(move || connect_from(src, dst, timeout))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("greeting {line:?}"));
        let (pod, seen) = line.trim().split_once(' ').ok_or_else(bad)?;
        let seen_from = seen.parse().map_err(|_| bad())?;
        Ok(PeerConn {
            pod: pod.to_string(),
            seen_from,
            reader,
            writer,
        })
    }

    /// Sends a line and returns the echo.
    pub fn echo(&mut self, msg: &str) -> io::Result<String> {
        writeln!(self.writer, "{msg}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim_end().to_string())
    }
}

/// One datagram from `ns` to `dst` on a connected socket (so only an answer from `dst` itself,
/// i.e. correctly reverse-translated, is received): (pod name, source the pod saw).
pub fn udp_peer(
    ns: &Netns,
    dst: SocketAddrV4,
    timeout: Duration,
) -> io::Result<(String, SocketAddr)> {
    let sock = ns.in_ns(move || -> io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(dst)?;
        Ok(s)
    })?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(b"who\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n]);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("answer {line:?}"));
    let (pod, seen) = line.trim().split_once(' ').ok_or_else(bad)?;
    Ok((pod.to_string(), seen.parse().map_err(|_| bad())?))
}

/// A TCP connection bound to `src` first (std has no bind-then-connect), with SO_REUSEADDR so
/// a test can reuse a source port right after a previous connection from it.
fn connect_from(
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(src) = src else {
        return TcpStream::connect_timeout(&dst.into(), timeout);
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscalls on a descriptor owned by `fd` from creation on.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // connect(2) on a blocking socket gives up after SO_SNDTIMEO.
        for (opt, val, size) in [
            (
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                mem::size_of_val(&one),
            ),
            (
                libc::SO_SNDTIMEO,
                &tv as *const _ as *const libc::c_void,
                mem::size_of_val(&tv),
            ),
        ] {
            if libc::setsockopt(raw, libc::SOL_SOCKET, opt, val, size as libc::socklen_t) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let local = sockaddr(src);
        if libc::bind(raw, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(dst);
        if libc::connect(raw, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            let e = io::Error::last_os_error();
            // EINPROGRESS/EAGAIN after SO_SNDTIMEO: report it like connect_timeout does.
            return Err(match e.raw_os_error() {
                Some(libc::EINPROGRESS | libc::EAGAIN) => {
                    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                }
                _ => e,
            });
        }
        Ok(TcpStream::from(fd))
    }
}

/// `svc-lb run` in one node's namespace, pinning under `/sys/fs/bpf/<prefix>-<node>`. Drop
/// stops it (SIGTERM, then SIGKILL after 5 s), runs `svc-lb uninstall` and prints its log if
/// the test failed.
pub struct NodeAgent {
    pub node: Node,
    pub pin_dir: PathBuf,
    bin: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NodeAgent {
    /// Starts the agent for `node` on `manifests` with `--node-name`, `--node-ip` (its client
    /// address) and one `--iface` per node interface, plus `extra` arguments.
    pub fn start(cluster: &Cluster, node: &Node, manifests: &Path, extra: &[&str]) -> NodeAgent {
        ensure_bpffs();
        let bin = bin_path("svc-lb", "SVC_LB_BIN");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-{}", cluster.prefix, node.name));
        let log = cluster.dir.join(format!("agent-{}.log", node.name));
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--manifests".into(),
            manifests.into(),
            "--node-name".into(),
            node.name.into(),
            "--node-ip".into(),
            node.client_ip.to_string().into(),
            "--pin-dir".into(),
            pin_dir.clone().into(),
            // Each node its own allocation record, as on separate machines.
            "--state-dir".into(),
            cluster.dir.join(format!("state-{}", node.name)).into(),
        ];
        for iface in &node.ifaces {
            args.extend(["--iface".into(), OsString::from(iface)]);
        }
        // The socket LB would attach to the machine's root cgroup and balance every process
        // (other tests included) into this test's Services.
        args.push("--no-socket-lb".into());
        args.extend(extra.iter().map(OsString::from));
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,svc_lb=debug");
        }
        node.ns.enter(&mut cmd);
        let out =
            fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log fd");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        NodeAgent {
            node: node.clone(),
            pin_dir,
            bin,
            log,
            child: Some(child),
        }
    }

    /// Panics (with the log) if the agent exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "svc-lb run on {} exited early ({status}); log:\n{}",
                self.node.name,
                self.log_text()
            );
        }
    }

    /// Runs `svc-lb <args> --pin-dir <pin_dir>` in the node's namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--pin-dir").arg(&self.pin_dir);
        self.node.ns.enter(&mut cmd);
        cmd.output()
            .unwrap_or_else(|e| panic!("run svc-lb {}: {e}", args.join(" ")))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::agent::stop_gracefully(child);
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
        crate::agent::remove_pins(&self.pin_dir, || self.cli(&["uninstall"]));
        if thread::panicking() {
            eprintln!(
                "---- svc-lb agent log of {} ({}) ----\n{}---- end of agent log ----",
                self.node.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}
