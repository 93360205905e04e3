//! B5 convergence and B6 memory, with the real agent (`svc-lb run`) reading a manifest
//! directory of `n` Services × `eps` endpoints, in a network namespace of its own with one
//! veth interface. The baseline is the same agent with one Service, in the same run.
//!
//! - B6: the agent's peak RSS (VmHWM) once the maps are programmed, and the kernel memory of
//!   its maps (`bytes_memlock` from bpftool for every pinned map).
//! - B5: a rewrite of one Service's manifest (one endpoint replaced) until the new backend is
//!   in that Service's slots, found by polling the pinned maps every 0.5 ms; p50 and p99.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use svc_lb_common::ALL_MAPS;
use svc_lb_common::{BackendV4, SCOPE_EXTERNAL, ServiceEntry, ServiceKeyV4, maps};
use svc_lb_tests::{
    manifests::{Port, join, service},
    netns::NODE_IP,
};

use crate::{
    BenchError, Result,
    ns::{TempDir, TempNetns},
    report::Row,
    scenario::{SERVICE_PORT, Scenario, Service},
    stats::quantile,
};

#[derive(Clone, Copy, Debug)]
pub struct B5B6Config {
    pub services: usize,
    pub eps: usize,
    pub pods: usize,
    /// Manifest changes timed for B5.
    pub changes: usize,
}

const FILE_CHUNK: usize = 1000;

/// The EndpointSlice of `svc` as the endpointslice controller writes it.
fn endpoint_slice(svc: &Service) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-abcde\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: {0}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
         addressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: {1}\nendpoints:\n",
        svc.name,
        target_port(svc)
    );
    for ep in &svc.endpoints {
        let _ = write!(
            s,
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n",
            ep.ip()
        );
    }
    s
}

/// The pods' port (the same for every endpoint of a scenario Service).
fn target_port(svc: &Service) -> u16 {
    svc.endpoints
        .first()
        .map_or(crate::scenario::TARGET_PORT, |e| e.port())
}

pub(crate) fn docs(svc: &Service) -> String {
    let ports = [Port::tcp("http", SERVICE_PORT, target_port(svc))];
    join(&[
        service(&svc.name, svc.cluster_ip, ("app", &svc.name), &ports),
        endpoint_slice(svc),
    ])
}

/// Writes Service 0 to `churn.yaml` and the others in files of 1000.
pub(crate) fn write_manifests(dir: &Path, staging: &Path, sc: &Scenario) -> Result<()> {
    write_atomic(dir, staging, "churn.yaml", &docs(&sc.services[0]))?;
    for (k, chunk) in sc.services[1..].chunks(FILE_CHUNK).enumerate() {
        let text = join(&chunk.iter().map(docs).collect::<Vec<_>>());
        write_atomic(dir, staging, &format!("services-{k:03}.yaml"), &text)?;
    }
    Ok(())
}

pub(crate) fn write_atomic(dir: &Path, staging: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = staging.join(file);
    fs::write(&tmp, text).map_err(BenchError::io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, dir.join(file)).map_err(BenchError::io("rename manifest"))
}

/// The running agent; Drop stops it and uninstalls its pins and links.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) bin: PathBuf,
    pub(crate) pins: PathBuf,
    pub(crate) log: PathBuf,
}

impl Agent {
    pub(crate) fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(BenchError::Check(format!(
                "svc-lb run exited ({st}); log:\n{}",
                self.log_tail()
            )));
        }
        Ok(())
    }

    fn status_kb(&self, field: &str) -> Result<u64> {
        let st = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .map_err(BenchError::io("read agent status"))?;
        st.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|r| {
                r.trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .ok_or_else(|| BenchError::Check(format!("no {field} in /proc/<agent>/status")))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.pins)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub(crate) fn open_hash<K: aya::Pod, V: aya::Pod>(
    pins: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(pins.join(name)).map_err(|e| BenchError::bpf(name, e))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|e| BenchError::bpf(name, e))
}

/// Backend addresses in the slots of `svc`'s frontend (empty if not programmed).
pub(crate) fn programmed_backends(
    services: &HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    backends: &HashMap<MapData, u32, BackendV4>,
    svc: &Service,
) -> Vec<Ipv4Addr> {
    let key = ServiceKeyV4::new(svc.cluster_ip, SERVICE_PORT, 6, SCOPE_EXTERNAL, 0);
    let Ok(fe) = services.get(&key, 0) else {
        return Vec::new();
    };
    (1..=fe.count)
        .filter_map(|s| services.get(&key.with_slot(s), 0).ok())
        .filter_map(|e| backends.get(&e.backend_id, 0).ok())
        .map(|b| b.ip())
        .collect()
}

/// Kernel memory of every pinned map under `pins` (bpftool's `bytes_memlock`).
pub(crate) fn map_memlock(pins: &Path) -> Result<u64> {
    let mut total = 0;
    for name in ALL_MAPS {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pins.join(name))
            .output()
            .map_err(BenchError::io("run bpftool (apt install bpftool)"))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| BenchError::Check(format!("bpftool map show {name}: {e}")))?;
        total += v["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

struct Measured {
    cold_start_s: f64,
    hwm_kb: u64,
    rss_kb: u64,
    memlock: u64,
    change_p50_s: f64,
    change_p99_s: f64,
}

fn measure(n: usize, cfg: &B5B6Config, bin: &Path) -> Result<Measured> {
    let mut sc = Scenario::synthetic(n, cfg.eps, cfg.pods);
    let ns = TempNetns::new("b6")?;
    // A veth pair rather than a dummy interface: not every kernel has the dummy driver.
    ns.run(
        "ip",
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
    )?;
    ns.run("ip", &["link", "set", "d1", "up"])?;
    ns.run(
        "ip",
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", "d0"],
    )?;
    ns.run("ip", &["link", "set", "d0", "up"])?;
    let scratch = TempDir::scratch("b6").map_err(BenchError::io("scratch dir"))?;
    let (dir, staging) = (scratch.0.join("manifests"), scratch.0.join("staging"));
    for d in [&dir, &staging] {
        fs::create_dir_all(d).map_err(BenchError::io("create manifest dir"))?;
    }
    write_manifests(&dir, &staging, &sc)?;
    let pins = TempDir::pins("b6").map_err(BenchError::io("create pin dir"))?;
    let log = scratch.0.join("agent.log");
    let logf = fs::File::create(&log).map_err(BenchError::io("create agent log"))?;
    let mut cmd = ns.command(
        &bin.to_string_lossy(),
        &[
            "run",
            "--iface",
            "d0",
            "--node-ip",
            &NODE_IP.to_string(),
            "--no-socket-lb",
        ],
    );
    cmd.arg("--manifests")
        .arg(&dir)
        .arg("--pin-dir")
        .arg(&pins.0)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            logf.try_clone().map_err(BenchError::io("log fd"))?,
        ))
        .stderr(Stdio::from(logf));
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(BenchError::io(format!("spawn {}", bin.display())))?;
    let mut agent = Agent {
        child,
        bin: bin.to_path_buf(),
        pins: pins.0.clone(),
        log,
    };
    // Converged when the first and the last Service have all their backends.
    let (first, last) = (sc.services[0].clone(), sc.services[n - 1].clone());
    let deadline = start + Duration::from_secs(120);
    let maps = loop {
        agent.check_running()?;
        if Instant::now() > deadline {
            return Err(BenchError::Check(format!(
                "agent did not program {n} Services in 120 s; log:\n{}",
                agent.log_tail()
            )));
        }
        // The agent creates the pins one by one: retry until both open.
        if let (Ok(services), Ok(backends)) = (
            open_hash::<ServiceKeyV4, ServiceEntry>(&pins.0, maps::SERVICES_MAP),
            open_hash::<u32, BackendV4>(&pins.0, maps::BACKENDS_MAP),
        ) {
            let done = [&first, &last]
                .iter()
                .all(|s| programmed_backends(&services, &backends, s).len() == s.endpoints.len());
            if done {
                break (services, backends);
            }
        }
        thread::sleep(Duration::from_millis(5));
    };
    let cold_start_s = start.elapsed().as_secs_f64();
    let (services, backends) = maps;

    let mut samples = Vec::new();
    for _ in 0..cfg.changes {
        let before = sc.services[0].clone();
        sc.change_one(0);
        let new_ip = *sc.services[0]
            .endpoints
            .iter()
            .find(|e| !before.endpoints.contains(e))
            .expect("a new endpoint")
            .ip();
        write_atomic(&dir, &staging, "churn.yaml", &docs(&sc.services[0]))?;
        let t = Instant::now();
        loop {
            if programmed_backends(&services, &backends, &sc.services[0]).contains(&new_ip) {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                agent.check_running()?;
                return Err(BenchError::Check(format!(
                    "change not programmed within 10 s; log:\n{}",
                    agent.log_tail()
                )));
            }
            thread::sleep(Duration::from_micros(500));
        }
        samples.push(t.elapsed().as_secs_f64());
        // Let the agent's rescan and debounce settle so changes do not overlap.
        thread::sleep(Duration::from_millis(150));
    }
    agent.check_running()?;
    Ok(Measured {
        cold_start_s,
        hwm_kb: agent.status_kb("VmHWM")?,
        rss_kb: agent.status_kb("VmRSS")?,
        memlock: map_memlock(&pins.0)?,
        change_p50_s: quantile(&samples, 0.5),
        change_p99_s: quantile(&samples, 0.99),
    })
}

pub fn run(cfg: &B5B6Config, bin: &Path, rows: &mut Vec<Row>) -> Result<()> {
    if !bin.is_file() {
        return Err(BenchError::Check(format!(
            "{} not found (cargo build --release -p svc-lb)",
            bin.display()
        )));
    }
    eprintln!("B5/B6: agent with 1 Service");
    let small = measure(1, cfg, bin)?;
    eprintln!(
        "B5/B6: agent with {} Services x {} endpoints",
        cfg.services, cfg.eps
    );
    let big = measure(cfg.services, cfg, bin)?;
    let scale = format!("{} svc x {} ep", cfg.services, cfg.eps);
    let base = "same agent, 1 Service".to_string();
    let mb = |kb: u64| kb as f64 / 1024.0;
    rows.push(
        Row::new(
            "B6",
            format!("agent peak RSS (VmHWM), {scale}"),
            mb(big.hwm_kb),
            "MiB",
            base.clone(),
            mb(small.hwm_kb),
        )
        .goal("< 150 MB", (big.hwm_kb as f64) * 1024.0 < 150e6),
    );
    rows.push(Row::new(
        "B6",
        format!("agent RSS after {} changes, {scale}", cfg.changes),
        mb(big.rss_kb),
        "MiB",
        base.clone(),
        mb(small.rss_kb),
    ));
    rows.push(Row::new(
        "B6",
        format!("BPF map memory (memlock, all pinned maps), {scale}"),
        big.memlock as f64 / 1048576.0,
        "MiB",
        base.clone(),
        small.memlock as f64 / 1048576.0,
    ));
    let ms = |s: f64| s * 1e3;
    rows.push(Row::new(
        "B5",
        format!(
            "manifest change -> maps, p50 ({} changes), {scale}",
            cfg.changes
        ),
        ms(big.change_p50_s),
        "ms",
        base.clone(),
        ms(small.change_p50_s),
    ));
    rows.push(
        Row::new(
            "B5",
            format!(
                "manifest change -> maps, p99 ({} changes), {scale}",
                cfg.changes
            ),
            ms(big.change_p99_s),
            "ms",
            base.clone(),
            ms(small.change_p99_s),
        )
        .goal("p99 < 50 ms", big.change_p99_s < 0.050),
    );
    rows.push(Row::new(
        "B5",
        format!("agent start -> all Services programmed, {scale}"),
        ms(big.cold_start_s),
        "ms",
        base,
        ms(small.cold_start_s),
    ));
    Ok(())
}
