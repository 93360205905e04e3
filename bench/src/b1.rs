//! B1 per-packet cost: BPF_PROG_TEST_RUN of `svc_lb_tc_ingress` and `svc_lb_xdp` on a packet to
//! a frontend and on one to no frontend, next to the empty `svc_lb_tc_pass` / `svc_lb_xdp_pass`
//! in the same run, with `n` other Services in the maps.
//!
//! TEST_RUN runs the program `repeat` times on the same buffer, so after the first iteration a
//! DNATed packet would be addressed to the backend and miss. The maps therefore also hold the
//! inverse frontend (backend address → the frontend address): every iteration matches and is
//! rewritten, alternating between the two, and after the first two iterations both directions
//! are conntrack hits (the steady state of an established flow). The DNAT counter is checked
//! to have grown by exactly the number of iterations.
//!
//! The maps are created with the sizes of [`B1Config::capacity`] (through the same
//! [`MapCapacity`] the agent's `--max-services/--max-backends/--max-conntrack` use), the same
//! at every scale of a run, so scales differ only in how full the maps are.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use svc_lb::{
    dataplane::{TC_INGRESS_PROG, XDP_PROG, capacity::MapCapacity, ebpf_object},
    maps::BpfLbMaps,
    model::{BackendAddr, Frontend, FrontendKey, FrontendKind, LbPolicy, Proto, ServicePortRef},
    reconcile::{Limits, Reconciler},
};
use svc_lb_common::{STAT_DNAT, TC_PASS_PROG, XDP_PASS_PROG, maps};
use svc_lb_tests::packet::{self, TCP_ACK};

use crate::{
    BenchError, Result, b5_b6::map_memlock, ns::TempDir, report::Row, scenario::Scenario,
    stats::median,
};

const MIB: f64 = 1024.0 * 1024.0;

/// The measured frontend and its one backend, outside the synthetic ranges (a million pods
/// from 10.244.0.2 reach into 11.3.x.x, so the backend is not in 10/8).
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 10), 80);
const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 251, 10), 8080);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 31, 0, 2), 40000);
/// Not a frontend: traffic straight to a pod.
const OTHER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 252, 99), 8080);

#[derive(Clone, Copy, Debug)]
pub struct B1Config {
    pub repeat: u32,
    pub rounds: usize,
    /// Map sizes for every scale.
    pub capacity: MapCapacity,
}

/// A frontend of kind ExternalIP (so the XDP program handles it too) with one backend.
fn pair_frontend(name: &str, from: SocketAddrV4, to: SocketAddrV4) -> Frontend {
    let key = FrontendKey {
        ip: *from.ip(),
        port: from.port(),
        proto: Proto::Tcp,
        internal: false,
    };
    Frontend {
        key,
        kind: FrontendKind::ExternalIp,
        service: ServicePortRef {
            namespace: "bench".into(),
            name: name.into(),
            port: "http".into(),
        },
        backends: vec![BackendAddr {
            ip: *to.ip(),
            port: to.port(),
        }],
        policy: LbPolicy::default(),
    }
}

fn dnat_count(ebpf: &Ebpf) -> Result<u64> {
    let map = ebpf
        .map(maps::STATS_MAP)
        .ok_or_else(|| BenchError::Bpf("no LB_STATS".into()))?;
    let a: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|e| BenchError::bpf("LB_STATS", e))?;
    Ok(a.get(&STAT_DNAT, 0)
        .map_err(|e| BenchError::bpf("read LB_STATS", e))?
        .iter()
        .sum())
}

/// Median over `rounds` of the kernel's average ns per iteration.
fn measure<P>(prog: &P, frame: &[u8], cfg: &B1Config) -> Result<(f64, u32)>
where
    P: for<'o> TestRun<Opts<'o> = TestRunOptions<'o>, Result = aya::programs::TestRunResult>,
{
    let mut samples = Vec::new();
    let mut ret = 0;
    for _ in 0..cfg.rounds {
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = cfg.repeat;
        let res = prog
            .test_run(opts)
            .map_err(|e| BenchError::bpf("BPF_PROG_TEST_RUN", e))?;
        ret = res.return_value;
        samples.push(res.duration.as_nanos() as f64);
    }
    Ok((median(&samples), ret))
}

struct Loaded {
    ebpf: Ebpf,
    pins: TempDir,
}

fn load(n: usize, eps: usize, pods: usize, capacity: &MapCapacity) -> Result<Loaded> {
    let pins = TempDir::pins("b1").map_err(BenchError::io("create pin dir"))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&pins.0);
    capacity.apply(&mut loader);
    let mut ebpf = loader
        .load(ebpf_object())
        .map_err(|e| BenchError::bpf("load object", e))?;
    for name in [TC_INGRESS_PROG, TC_PASS_PROG] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| BenchError::Bpf(format!("no program {name}")))?
            .try_into()
            .map_err(|e| BenchError::bpf(name, e))?;
        p.load().map_err(|e| BenchError::bpf(name, e))?;
    }
    for name in [XDP_PROG, XDP_PASS_PROG] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| BenchError::Bpf(format!("no program {name}")))?
            .try_into()
            .map_err(|e| BenchError::bpf(name, e))?;
        p.load().map_err(|e| BenchError::bpf(name, e))?;
    }
    let mut desired = Scenario::synthetic(n, eps, pods).desired();
    for fe in [
        pair_frontend("bench-forward", VIP, BACKEND),
        pair_frontend("bench-inverse", BACKEND, VIP),
    ] {
        desired.frontends.insert(fe.key, fe);
    }
    let mut maps = BpfLbMaps::open(&pins.0).map_err(|e| BenchError::bpf("open pins", e))?;
    let out = Reconciler::new(Limits::from(capacity))
        .full(&mut maps, &desired)
        .map_err(|e| BenchError::bpf("reconcile", e))?;
    if !out.errors.is_empty() || out.frontends != n + 2 {
        return Err(BenchError::Check(format!(
            "programmed {} of {} frontends: {:?}",
            out.frontends,
            n + 2,
            out.errors.first().map(ToString::to_string)
        )));
    }
    Ok(Loaded { ebpf, pins })
}

fn prog<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<&'a T>
where
    &'a T: TryFrom<&'a aya::programs::Program>,
{
    let p = ebpf
        .program(name)
        .ok_or_else(|| BenchError::Bpf(format!("no program {name}")))?;
    <&T>::try_from(p).map_err(|_| BenchError::Bpf(format!("{name}: wrong program type")))
}

/// Measures at `n` Services (+ the measured pair) and appends rows.
pub fn run_scale(
    n: usize,
    eps: usize,
    pods: usize,
    cfg: &B1Config,
    rows: &mut Vec<Row>,
) -> Result<()> {
    eprintln!("B1: {n} Services x {eps} endpoints ({pods} pods): loading maps");
    let started = std::time::Instant::now();
    let l = load(n, eps, pods, &cfg.capacity)?;
    eprintln!("B1: programmed in {:.1}s", started.elapsed().as_secs_f64());
    let matching = packet::tcp(CLIENT, VIP, TCP_ACK, 1, 1, &[0x61; 64]);
    let other = packet::tcp(CLIENT, OTHER, TCP_ACK, 1, 1, &[0x61; 64]);
    // Endpoint j of Service i is pod (i * eps + j) % pods: distinct pods, plus the pair's.
    let backends = (n * eps).min(pods) + 2;
    let scale = format!("{} Services, {backends} backends", n + 2);
    kind_rows::<SchedClassifier>(
        &l,
        "TC",
        TC_INGRESS_PROG,
        TC_PASS_PROG,
        &matching,
        &other,
        &scale,
        cfg,
        rows,
    )?;
    kind_rows::<Xdp>(
        &l,
        "XDP",
        XDP_PROG,
        XDP_PASS_PROG,
        &matching,
        &other,
        &scale,
        cfg,
        rows,
    )?;
    // What the maps cost at this size and fill, next to default-size maps with only the pair.
    let mem = map_memlock(&l.pins.0)? as f64 / MIB;
    drop(l);
    let base = {
        let d = load(0, 0, 1, &MapCapacity::default())?;
        map_memlock(&d.pins.0)? as f64 / MIB
    };
    let c = &cfg.capacity;
    rows.push(Row::new(
        "B1",
        format!(
            "BPF map memory (memlock), maps for {} frontends / {} backends, {scale}",
            c.max_services, c.max_backends
        ),
        mem,
        "MiB",
        "default sizes, 2 Services".into(),
        base,
    ));
    // Give the kernel a moment to free this scale's maps before the next one loads.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn kind_rows<'a, P>(
    l: &'a Loaded,
    kind: &str,
    real: &str,
    empty: &str,
    matching: &[u8],
    other: &[u8],
    scale: &str,
    cfg: &B1Config,
    rows: &mut Vec<Row>,
) -> Result<()>
where
    P: for<'o> TestRun<Opts<'o> = TestRunOptions<'o>, Result = aya::programs::TestRunResult> + 'a,
    &'a P: TryFrom<&'a aya::programs::Program>,
{
    let real_p = prog::<P>(&l.ebpf, real)?;
    let empty_p = prog::<P>(&l.ebpf, empty)?;
    let (base_ns, _) = measure(empty_p, matching, cfg)?;
    let before = dnat_count(&l.ebpf)?;
    let (hit_ns, _) = measure(real_p, matching, cfg)?;
    let dnats = dnat_count(&l.ebpf)? - before;
    let expected = u64::from(cfg.repeat) * cfg.rounds as u64;
    if dnats != expected {
        return Err(BenchError::Check(format!(
            "{real}: {dnats} DNATs for {expected} iterations: the packet did not match every time"
        )));
    }
    let (miss_ns, _) = measure(real_p, other, cfg)?;
    if dnat_count(&l.ebpf)? != before + dnats {
        return Err(BenchError::Check(format!(
            "{real}: non-matching packet was DNATed"
        )));
    }
    let within = |v: f64| v <= 2.0 * base_ns;
    rows.push(
        Row::new(
            "B1",
            format!("{kind} {real} matching (DNAT, CT hit), {scale}"),
            hit_ns,
            "ns/pkt",
            format!("{empty} (empty)"),
            base_ns,
        )
        .goal("<= 2x empty", within(hit_ns)),
    );
    rows.push(
        Row::new(
            "B1",
            format!("{kind} {real} non-matching, {scale}"),
            miss_ns,
            "ns/pkt",
            format!("{empty} (empty)"),
            base_ns,
        )
        .goal("<= 2x empty", within(miss_ns)),
    );
    Ok(())
}
