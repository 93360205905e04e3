//! B2 first-packet latency and B3 throughput through real network namespaces (the test
//! topology: client → node → pod-a running `svc-lb-echo`), for svc-lb (the real agent),
//! kube-proxy's rules via iptables-legacy, iptables-nft and nftables, and straight to the pod.
//!
//! Every connection is new (new conntrack entry / new flow, so the first packet walks the
//! rules): connect + one HTTP request (`Connection: close`) + the answer, to the ClusterIP of a
//! Service chosen at random among `n`, all of which lead to the pod. Each mode gets a fresh
//! topology, so no rules of one mode are left for the next. One client thread, which also
//! gives B3's connections/s; B3's keep-alive requests/s reuse one connection.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use svc_lb_common::{BackendV4, ServiceEntry, ServiceKeyV4, maps};
use svc_lb_tests::netns::{NODE_IP, Netns, Topology};

use crate::{
    BenchError, Result,
    b5_b6::{Agent, open_hash, programmed_backends, write_manifests},
    kubeproxy::{iptables, nftables},
    ns::{TempDir, run_timed},
    report::Row,
    scenario::{SERVICE_PORT, Scenario},
    stats::quantile,
};

/// pod-a's echo server (HTTP on 5000).
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 5000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    SvcLb,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Direct,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::SvcLb => "svc-lb",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::IptablesNft => "kube-proxy iptables (nft)",
            Mode::Nftables => "kube-proxy nftables",
            Mode::Direct => "direct to pod",
        }
    }
}

#[derive(Clone, Debug)]
pub struct B2B3Config {
    pub scales: Vec<usize>,
    /// iperf3 duration of each B3 bulk run (seconds).
    pub bulk_secs: u32,
    pub conns: usize,
    pub keepalive_reqs: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub p50_us: f64,
    pub p99_us: f64,
    pub conns_per_s: f64,
    pub reqs_per_s: f64,
}

fn run_in(ns: &Netns, program: &str, args: &[&str], input: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    ns.enter(&mut cmd);
    run_timed(cmd, input)?;
    Ok(())
}

/// One request on a new connection; checks that the pod answered.
fn one_request(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if !body.ends_with(b"pod-a") && !String::from_utf8_lossy(&body).contains("pod-a") {
        return Err(std::io::Error::other("answer not from pod-a"));
    }
    Ok(())
}

fn keepalive(to: SocketAddr, reqs: usize) -> std::io::Result<f64> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let start = Instant::now();
    for _ in 0..reqs {
        w.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n")?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().map_err(std::io::Error::other)?;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
    }
    Ok(reqs as f64 / start.elapsed().as_secs_f64())
}

/// The client loop, run on a thread inside the client namespace.
fn client_loop(targets: Vec<SocketAddr>, conns: usize, reqs: usize) -> std::io::Result<Measured> {
    // Warm-up (and proof that the path works) on a few targets.
    for t in targets.iter().take(20) {
        one_request(*t)?;
    }
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::with_capacity(conns);
    let start = Instant::now();
    for _ in 0..conns {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let to = targets[(rng % targets.len() as u64) as usize];
        let t = Instant::now();
        one_request(to)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let conns_per_s = conns as f64 / start.elapsed().as_secs_f64();
    let reqs_per_s = keepalive(targets[0], reqs)?;
    Ok(Measured {
        p50_us: quantile(&lat, 0.5),
        p99_us: quantile(&lat, 0.99),
        conns_per_s,
        reqs_per_s,
    })
}

fn topology() -> Result<Topology> {
    std::panic::catch_unwind(|| {
        let t = Topology::new(1);
        t.start_echo_servers();
        t
    })
    .map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        BenchError::Check(format!("topology: {msg}"))
    })
}

/// What keeps a mode's datapath alive while traffic runs (the agent and its pins).
struct Programmed {
    _agent: Option<Agent>,
    _pins: Option<TempDir>,
    _scratch: TempDir,
}

impl Drop for Programmed {
    fn drop(&mut self) {
        // Agent (stopped + uninstalled) before its pin dir goes.
        self._agent = None;
        self._pins = None;
    }
}

/// Programs `sc` in the topology's node namespace the way `mode` does.
fn program(mode: Mode, topo: &Topology, sc: &Scenario, svc_lb: &Path) -> Result<Programmed> {
    let n = sc.services.len();
    let scratch = TempDir::scratch("b2").map_err(BenchError::io("scratch dir"))?;
    let mut _agent = None;
    let mut _pins = None;
    match mode {
        Mode::Direct => {}
        Mode::IptablesLegacy | Mode::IptablesNft => {
            let restore = if mode == Mode::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            };
            let (h, f) = (scratch.0.join("hooks"), scratch.0.join("full"));
            fs::write(&h, iptables::hooks()).map_err(BenchError::io("write rules"))?;
            fs::write(&f, iptables::restore(sc, None, &[]))
                .map_err(BenchError::io("write rules"))?;
            run_in(&topo.node, restore, &["--noflush"], Some(&h))?;
            run_in(&topo.node, restore, &["--noflush"], Some(&f))?;
        }
        Mode::Nftables => {
            let f = scratch.0.join("full.nft");
            fs::write(&f, nftables::full(sc, &NODE_IP.to_string()))
                .map_err(BenchError::io("write nft"))?;
            run_in(&topo.node, "nft", &["-f", "-"], Some(&f))?;
        }
        Mode::SvcLb => {
            let (dir, staging) = (scratch.0.join("m"), scratch.0.join("s"));
            for d in [&dir, &staging] {
                fs::create_dir_all(d).map_err(BenchError::io("manifest dir"))?;
            }
            write_manifests(&dir, &staging, sc)?;
            let pins = TempDir::pins("b2").map_err(BenchError::io("pin dir"))?;
            let log = scratch.0.join("agent.log");
            let logf = fs::File::create(&log).map_err(BenchError::io("agent log"))?;
            let mut cmd = Command::new(svc_lb);
            cmd.arg("run")
                .arg("--manifests")
                .arg(&dir)
                .arg("--pin-dir")
                .arg(&pins.0);
            cmd.args(["--node-ip", &NODE_IP.to_string(), "--no-socket-lb"]);
            for i in topo.node_ifaces() {
                cmd.args(["--iface", &i]);
            }
            cmd.env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    logf.try_clone().map_err(BenchError::io("log fd"))?,
                ))
                .stderr(Stdio::from(logf));
            topo.node.enter(&mut cmd);
            let child = cmd.spawn().map_err(BenchError::io("spawn svc-lb"))?;
            let mut agent = Agent {
                child,
                bin: svc_lb.to_path_buf(),
                pins: pins.0.clone(),
                log,
            };
            let deadline = Instant::now() + Duration::from_secs(120);
            let last = sc.services[n - 1].clone();
            loop {
                agent.check_running()?;
                if Instant::now() > deadline {
                    return Err(BenchError::Check(format!(
                        "agent did not converge; log:\n{}",
                        agent.log_tail()
                    )));
                }
                // The agent creates the pins one by one: retry until both open. The last
                // Service is a cheap first sign; then every frontend must have its backend
                // (traffic to one still missing would fail as "network unreachable").
                if let (Ok(s), Ok(b)) = (
                    open_hash::<ServiceKeyV4, ServiceEntry>(&pins.0, maps::SERVICES_MAP),
                    open_hash::<u32, BackendV4>(&pins.0, maps::BACKENDS_MAP),
                ) && programmed_backends(&s, &b, &last).len() == 1
                {
                    let ready = programmed_frontends(&s);
                    if ready == n {
                        break;
                    }
                    if Instant::now() + Duration::from_millis(200) > deadline {
                        return Err(BenchError::Check(format!(
                            "agent programmed {ready} of {n} Services; log:\n{}",
                            agent.log_tail()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            _agent = Some(agent);
            _pins = Some(pins);
        }
    }
    Ok(Programmed {
        _agent,
        _pins,
        _scratch: scratch,
    })
}

/// Frontends (slot 0 entries) that have at least one backend slot.
fn programmed_frontends(services: &HashMap<MapData, ServiceKeyV4, ServiceEntry>) -> usize {
    services
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, e)| k.backend_slot == 0 && e.count > 0)
        .count()
}

pub fn measure(mode: Mode, n: usize, cfg: &B2B3Config, svc_lb: &Path) -> Result<Measured> {
    let topo = topology()?;
    let sc = Scenario::single_backend(n, POD);
    let programmed = program(mode, &topo, &sc, svc_lb)?;
    let targets: Vec<SocketAddr> = if mode == Mode::Direct {
        vec![SocketAddr::V4(POD)]
    } else {
        sc.services
            .iter()
            .map(|s| SocketAddr::from((s.cluster_ip, SERVICE_PORT)))
            .collect()
    };
    let (conns, reqs) = (cfg.conns, cfg.keepalive_reqs);
    let res = topo
        .client
        .in_ns(move || client_loop(targets, conns, reqs))
        .map_err(|e| {
            BenchError::Check(format!(
                "{} at {n} Services: traffic failed: {e}",
                mode.label()
            ))
        });
    drop(programmed);
    res
}

/// B3 bulk: one iperf3 TCP stream for `secs` from the client to the pod through one Service
/// (port 80 → the pod's 5201), in Gbit/s.
pub fn bulk(mode: Mode, secs: u32, svc_lb: &Path) -> Result<f64> {
    let topo = topology()?;
    let pod = SocketAddrV4::new(*POD.ip(), 5201);
    let sc = Scenario::single_backend(1, pod);
    let programmed = program(mode, &topo, &sc, svc_lb)?;
    let mut server = Command::new("iperf3");
    server
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    topo.pods[0].ns.enter(&mut server);
    let mut server = server
        .spawn()
        .map_err(BenchError::io("spawn iperf3 -s (apt install iperf3)"))?;
    std::thread::sleep(Duration::from_millis(300));
    let target = if mode == Mode::Direct {
        pod
    } else {
        SocketAddrV4::new(sc.services[0].cluster_ip, SERVICE_PORT)
    };
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ]);
    client.args(["-t", &secs.to_string(), "-J"]);
    topo.client.enter(&mut client);
    let res = run_timed(client, None);
    let _ = server.kill();
    let _ = server.wait();
    drop(programmed);
    let (out, _) = res?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| BenchError::Check(format!("iperf3 -J output: {e}")))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| BenchError::Check("iperf3: no end.sum_received.bits_per_second".into()))
}

const MODES: [Mode; 5] = [
    Mode::SvcLb,
    Mode::IptablesLegacy,
    Mode::IptablesNft,
    Mode::Nftables,
    Mode::Direct,
];

pub fn run(cfg: &B2B3Config, svc_lb: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let mut gbps = Vec::new();
    for mode in MODES {
        eprintln!("B3: bulk iperf3, {}", mode.label());
        gbps.push(bulk(mode, cfg.bulk_secs, svc_lb)?);
    }
    for (mode, g) in MODES[1..].iter().zip(&gbps[1..]) {
        let mut row = Row::new(
            "B3",
            "bulk TCP (iperf3, 1 stream), 1 Service: svc-lb".into(),
            gbps[0],
            "Gbit/s",
            mode.label().to_string(),
            *g,
        );
        if *mode == Mode::IptablesLegacy || *mode == Mode::IptablesNft {
            row = row.goal(">= iptables", gbps[0] >= *g);
        }
        rows.push(row);
    }
    for (k, &n) in cfg.scales.iter().enumerate() {
        let mut got = Vec::new();
        for mode in MODES {
            eprintln!("B2/B3: {} with {n} Services", mode.label());
            got.push((mode, measure(mode, n, cfg, svc_lb)?));
        }
        let ours = got[0].1;
        for (mode, m) in &got[1..] {
            let worse_ok = *mode != Mode::Nftables || ours.p50_us <= m.p50_us;
            let mut row = Row::new(
                "B2",
                format!("connect+request p50, random of {n} Services: svc-lb"),
                ours.p50_us,
                "us",
                mode.label().to_string(),
                m.p50_us,
            );
            if *mode == Mode::Nftables {
                row = row.goal("never worse than nftables", worse_ok);
            }
            rows.push(row);
        }
        for (mode, m) in &got[1..] {
            rows.push(Row::new(
                "B2",
                format!("connect+request p99, random of {n} Services: svc-lb"),
                ours.p99_us,
                "us",
                mode.label().to_string(),
                m.p99_us,
            ));
        }
        if k == 0 {
            for (mode, m) in &got[1..] {
                let mut row = Row::new(
                    "B3",
                    format!("new connections/s (1 client thread), {n} Services: svc-lb"),
                    ours.conns_per_s,
                    "conn/s",
                    mode.label().to_string(),
                    m.conns_per_s,
                );
                if *mode == Mode::IptablesLegacy || *mode == Mode::IptablesNft {
                    row = row.goal(">= iptables", ours.conns_per_s >= m.conns_per_s);
                }
                rows.push(row);
            }
            for (mode, m) in &got[1..] {
                rows.push(Row::new(
                    "B3",
                    format!("keep-alive requests/s (1 connection), {n} Services: svc-lb"),
                    ours.reqs_per_s,
                    "req/s",
                    mode.label().to_string(),
                    m.reqs_per_s,
                ));
            }
        }
    }
    Ok(())
}
