//! svc-lb finds kube-proxy's leftovers (`svc-lb debug kube-proxy`, and the agent's warning at
//! start) in the rules the benchmark loads as kube-proxy's: iptables-legacy, iptables-nft
//! (IPv4 and IPv6) and nftables, each in a network namespace of its own. Needs root, the
//! iptables and nftables packages, and the svc-lb binary (`cargo build --bins`).

use std::{fs, time::Duration};

use svc_lb_bench::{
    kubeproxy::{iptables, nftables},
    ns::{TempDir, TempNetns},
    scenario::Scenario,
};
use svc_lb_tests::bin_path;

/// `svc-lb debug kube-proxy -o json` in `ns`.
fn leftovers(ns: &TempNetns) -> serde_json::Value {
    let bin = bin_path("svc-lb", "SVC_LB_BIN");
    let out = ns
        .command(
            &bin.to_string_lossy(),
            &["debug", "kube-proxy", "-o", "json"],
        )
        .output()
        .expect("run svc-lb");
    assert!(
        out.status.success(),
        "svc-lb debug kube-proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// (backend, where, found) of every leftover.
fn found(v: &serde_json::Value) -> Vec<(String, String, String)> {
    assert_eq!(v["unchecked"], serde_json::json!([]), "{v}");
    v["leftovers"]
        .as_array()
        .expect("leftovers")
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or_default().to_string();
            (s("backend"), s("location"), s("found"))
        })
        .collect()
}

fn table(ns: &TempNetns) -> String {
    let bin = bin_path("svc-lb", "SVC_LB_BIN");
    let out = ns
        .command(&bin.to_string_lossy(), &["debug", "kube-proxy"])
        .output()
        .expect("run svc-lb");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn clean_namespace_has_no_leftovers() {
    let ns = TempNetns::new("kp0").unwrap();
    assert_eq!(found(&leftovers(&ns)), []);
    assert!(table(&ns).starts_with("no kube-proxy leftovers found"));
}

#[test]
fn iptables_rules_of_kube_proxy_are_found_with_legacy_and_nft() {
    // 3 Services with 2 endpoints each: 3 KUBE-SVC-* and 6 KUBE-SEP-* chains.
    let sc = Scenario::synthetic(3, 2, 10);
    let dir = TempDir::scratch("kp").unwrap();
    let (hooks, rules) = (dir.0.join("hooks"), dir.0.join("rules"));
    fs::write(&hooks, iptables::hooks()).unwrap();
    fs::write(&rules, iptables::restore(&sc, None, &[])).unwrap();
    for (backend, restore) in [
        ("iptables-legacy", "iptables-legacy-restore"),
        ("iptables-nft", "iptables-nft-restore"),
    ] {
        let ns = TempNetns::new("kp").unwrap();
        // kubelet's own chains are not kube-proxy's: never reported.
        for t in ["filter", "mangle"] {
            let tool = restore.trim_end_matches("-restore");
            ns.run(tool, &["-t", t, "-N", "KUBE-FIREWALL"]).unwrap();
        }
        for input in [&hooks, &rules] {
            ns.run_input(restore, &["--noflush"], input)
                .unwrap_or_else(|e| panic!("{restore}: {e}"));
        }
        // kube-proxy hooks KUBE-SERVICES from nat (DNAT) and filter (reject without endpoints).
        let mut f = found(&leftovers(&ns));
        f.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(f.len(), 2, "{backend}: {f:?}");
        assert_eq!(
            (f[0].0.as_str(), f[0].1.as_str()),
            (backend, "ip filter"),
            "{f:?}"
        );
        let (b, at, what) = &f[1];
        assert_eq!((b.as_str(), at.as_str()), (backend, "ip nat"));
        assert_eq!(
            what,
            "KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ, 3 KUBE-SVC-*, 6 KUBE-SEP-*",
            "{backend}"
        );
        let t = table(&ns);
        assert!(
            t.contains(&format!(
                "cleanup: kube-proxy --cleanup   (or: {}",
                &restore[..restore.len() - 8]
            )),
            "{t}"
        );
    }
}

#[test]
fn ip6tables_kube_services_chain_is_found() {
    for (backend, tool) in [
        ("iptables-legacy", "ip6tables-legacy"),
        ("iptables-nft", "ip6tables-nft"),
    ] {
        let ns = TempNetns::new("kp6").unwrap();
        ns.run(tool, &["-t", "nat", "-N", "KUBE-SERVICES"]).unwrap();
        ns.run(
            tool,
            &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        )
        .unwrap();
        let f = found(&leftovers(&ns));
        assert_eq!(
            f,
            [(backend.into(), "ip6 nat".into(), "KUBE-SERVICES".into())],
            "{tool}"
        );
    }
}

#[test]
fn nftables_mode_table_is_found() {
    let sc = Scenario::synthetic(3, 2, 10);
    let dir = TempDir::scratch("kpnft").unwrap();
    let rules = dir.0.join("full.nft");
    fs::write(&rules, nftables::full(&sc, "172.31.0.1")).unwrap();
    let ns = TempNetns::new("kpnft").unwrap();
    ns.run_input("nft", &["-f", "-"], &rules).unwrap();
    let chains = ns.run("nft", &["list", "chains", "ip"]).unwrap();
    let want = chains
        .lines()
        .filter(|l| l.trim_start().starts_with("chain "))
        .count();
    let f = found(&leftovers(&ns));
    assert_eq!(
        f,
        [(
            "nftables".into(),
            "ip kube-proxy".into(),
            format!("table with {want} chains")
        )]
    );
    assert!(table(&ns).contains("nft delete table ip kube-proxy"));
}

#[test]
fn agent_warns_at_start_with_the_cleanup_command() {
    let sc = Scenario::synthetic(2, 1, 10);
    let dir = TempDir::scratch("kpagent").unwrap();
    let rules = dir.0.join("full.nft");
    fs::write(&rules, nftables::full(&sc, "172.31.0.1")).unwrap();
    let (topo, mdir) = svc_lb_tests::fixture::standard();
    topo.node.run("nft", &["-f", &rules.to_string_lossy()]);
    let mut agent = svc_lb_tests::agent::AgentGuard::start(&topo, &mdir.path);
    svc_lb_tests::wait_for(
        "the agent's warning about kube-proxy's nftables table",
        Duration::from_secs(20),
        || {
            agent.assert_running();
            agent
                .log_text()
                .lines()
                .any(|l| {
                    l.contains("WARN")
                        && l.contains("kube-proxy's rules are still on this node")
                        && l.contains("nft delete table ip kube-proxy")
                })
                .then_some(())
        },
    );
    // It warns and goes on: the Services are served all the same.
    svc_lb_tests::fixture::wait_serving(&topo, &mut agent);
}
