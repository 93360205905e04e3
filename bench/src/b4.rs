//! B4 programming cost: installing `n` Services × `eps` endpoints from scratch, and changing one
//! Service's endpoints, with svc-lb (full reconcile, then incremental syncs of the changed
//! frontend, into real pinned maps: what the agent runs) and with kube-proxy's rules loaded by
//! iptables-legacy-restore, iptables-nft-restore and nft -f (each in a fresh network namespace;
//! wall time of the process, as kube-proxy execs it per sync).

use std::{collections::BTreeSet, fs, path::Path, time::Instant};

use aya::EbpfLoader;
use svc_lb::{
    dataplane::ebpf_object,
    maps::BpfLbMaps,
    model::{FrontendKey, Proto},
    reconcile::{Limits, Reconciler},
};

use crate::{
    BenchError, Result,
    kubeproxy::{iptables, nftables},
    ns::{TempDir, TempNetns},
    report::Row,
    scenario::Scenario,
    stats::median,
};

#[derive(Clone, Copy, Debug)]
pub struct B4Config {
    pub services: usize,
    pub eps: usize,
    pub pods: usize,
    /// One-Service changes measured (median reported).
    pub changes: usize,
}

/// Seconds for the full install and the median of the one-Service changes.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub full_s: f64,
    pub change_s: f64,
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

pub fn svc_lb(cfg: &B4Config, sc: &Scenario) -> Result<Timing> {
    let pins = TempDir::pins("b4").map_err(BenchError::io("create pin dir"))?;
    let _ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins.0)
        .load(ebpf_object())
        .map_err(|e| BenchError::bpf("load object", e))?;
    let mut maps = BpfLbMaps::open(&pins.0).map_err(|e| BenchError::bpf("open pins", e))?;
    // What the agent runs: a full reconcile (dump, plan, apply) at startup, then each change
    // planned against the reconciler's record of the maps for the changed frontend only.
    let mut rec = Reconciler::new(Limits::default());
    let t = Instant::now();
    let out = rec
        .full(&mut maps, &sc.desired())
        .map_err(|e| BenchError::bpf("full reconcile", e))?;
    let full_s = t.elapsed().as_secs_f64();
    if !out.errors.is_empty() || out.frontends != sc.services.len() {
        return Err(BenchError::Check(format!(
            "svc-lb programmed {} of {} frontends; first error: {:?}",
            out.frontends,
            sc.services.len(),
            out.errors.first().map(ToString::to_string)
        )));
    }
    let mut cur = sc.clone();
    let mut samples = Vec::new();
    for k in 0..cfg.changes {
        let i = cur.change_one((k * 7919) % cur.services.len());
        // The agent keeps its desired state up to date incrementally; here it is rebuilt
        // (untimed) and the changed frontend named, as the translator reports it.
        let desired = cur.desired();
        let changed = BTreeSet::from([FrontendKey {
            ip: cur.services[i].cluster_ip,
            port: crate::scenario::SERVICE_PORT,
            proto: Proto::Tcp,
            internal: false,
        }]);
        let t = Instant::now();
        let out = rec
            .changed(&mut maps, &desired, &changed)
            .map_err(|e| BenchError::bpf("change reconcile", e))?;
        samples.push(t.elapsed().as_secs_f64());
        if out.ops == 0 {
            return Err(BenchError::Check("a change produced no map writes".into()));
        }
    }
    Ok(Timing {
        full_s,
        change_s: median(&samples),
    })
}

/// Loads the ruleset with `restore` (iptables-legacy-restore or iptables-nft-restore).
pub fn iptables(
    cfg: &B4Config,
    sc: &Scenario,
    restore: &str,
    save: &str,
    dir: &Path,
) -> Result<Timing> {
    let ns = TempNetns::new("b4ipt")?;
    let hooks = dir.join("hooks.rules");
    fs::write(&hooks, iptables::hooks()).map_err(BenchError::io("write hooks"))?;
    let args = ["-w", "5", "--noflush", "--counters"];
    ns.run_input(restore, &args, &hooks)?;
    let full = dir.join("full.rules");
    fs::write(&full, iptables::restore(sc, None, &[])).map_err(BenchError::io("write rules"))?;
    let full_s = ns.run_input(restore, &args, &full)?.as_secs_f64();
    let saved = ns.run(save, &["-t", "nat"])?;
    let seps = saved
        .lines()
        .filter(|l| l.starts_with(":KUBE-SEP-"))
        .count();
    if seps != sc.endpoint_count() {
        return Err(BenchError::Check(format!(
            "{save}: {seps} KUBE-SEP chains, expected {}",
            sc.endpoint_count()
        )));
    }
    let mut cur = sc.clone();
    let mut samples = Vec::new();
    for k in 0..cfg.changes {
        let before = cur.clone();
        let i = cur.change_one((k * 7919) % cur.services.len());
        let gone = iptables::removed_seps(&before.services[i], &cur.services[i]);
        let path = dir.join(format!("change{k}.rules"));
        fs::write(&path, iptables::restore(&cur, Some(&[i]), &gone))
            .map_err(BenchError::io("write rules"))?;
        samples.push(ns.run_input(restore, &args, &path)?.as_secs_f64());
    }
    Ok(Timing {
        full_s,
        change_s: median(&samples),
    })
}

pub fn nft(cfg: &B4Config, sc: &Scenario, dir: &Path) -> Result<Timing> {
    let ns = TempNetns::new("b4nft")?;
    let full = dir.join("full.nft");
    fs::write(&full, nftables::full(sc, "172.31.0.1")).map_err(BenchError::io("write nft"))?;
    let full_s = ns.run_input("nft", &["-f", "-"], &full)?.as_secs_f64();
    let chains = ns.run("nft", &["list", "chains", "ip"])?;
    let eps = chains
        .lines()
        .filter(|l| l.trim_start().starts_with("chain endpoint-"))
        .count();
    if eps != sc.endpoint_count() {
        return Err(BenchError::Check(format!(
            "nft: {eps} endpoint chains, expected {}",
            sc.endpoint_count()
        )));
    }
    let mut cur = sc.clone();
    let mut samples = Vec::new();
    for k in 0..cfg.changes {
        let before = cur.clone();
        let i = cur.change_one((k * 7919) % cur.services.len());
        let path = dir.join(format!("change{k}.nft"));
        fs::write(
            &path,
            nftables::change(&before.services[i], &cur.services[i]),
        )
        .map_err(BenchError::io("write nft"))?;
        samples.push(ns.run_input("nft", &["-f", "-"], &path)?.as_secs_f64());
    }
    Ok(Timing {
        full_s,
        change_s: median(&samples),
    })
}

/// Runs all four and appends rows: svc-lb's figure with each kube-proxy mode as baseline.
pub fn run(cfg: &B4Config, rows: &mut Vec<Row>) -> Result<()> {
    let sc = Scenario::synthetic(cfg.services, cfg.eps, cfg.pods);
    let scale = format!(
        "{} svc x {} ep ({} pods)",
        cfg.services,
        cfg.eps,
        sc.distinct_backends()
    );
    eprintln!("B4: {scale}: svc-lb");
    let ours = svc_lb(cfg, &sc)?;
    let mut base = Vec::new();
    let mut failed = Vec::new();
    for (label, restore, save) in [
        (
            "iptables-legacy-restore",
            "iptables-legacy-restore",
            "iptables-legacy-save",
        ),
        (
            "iptables-nft-restore",
            "iptables-nft-restore",
            "iptables-nft-save",
        ),
    ] {
        eprintln!("B4: {scale}: {label}");
        let dir = TempDir::scratch("b4").map_err(BenchError::io("scratch dir"))?;
        match iptables(cfg, &sc, restore, save, &dir.0) {
            Ok(t) => base.push((label, t)),
            Err(e) => failed.push(format!("{label}: {e}")),
        }
    }
    eprintln!("B4: {scale}: nft -f");
    let dir = TempDir::scratch("b4").map_err(BenchError::io("scratch dir"))?;
    match nft(cfg, &sc, &dir.0) {
        Ok(t) => base.push(("nft -f (nftables mode)", t)),
        Err(e) => failed.push(format!("nft -f: {e}")),
    }
    for (label, t) in &base {
        rows.push(
            Row::new(
                "B4",
                format!("full sync {scale}: svc-lb reconcile"),
                ms(ours.full_s),
                "ms",
                label.to_string(),
                ms(t.full_s),
            )
            .goal("< 1 s", ours.full_s < 1.0),
        );
    }
    for (label, t) in &base {
        rows.push(
            Row::new(
                "B4",
                format!(
                    "one Service changed (median of {}): svc-lb incremental sync",
                    cfg.changes
                ),
                ms(ours.change_s),
                "ms",
                label.to_string(),
                ms(t.change_s),
            )
            .goal("< 5 ms", ours.change_s < 0.005),
        );
    }
    if !failed.is_empty() {
        return Err(BenchError::Check(format!(
            "baselines without a result at {scale}: {}",
            failed.join("; ")
        )));
    }
    Ok(())
}
