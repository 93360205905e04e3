//! The generated kube-proxy rules are accepted by the real tools, in a network namespace of the
//! test's own: iptables-restore --test (legacy and nft), nft -c, and a real load whose result
//! has the expected chains. Needs root and the iptables/nftables packages; fails otherwise.

use std::fs;

use svc_lb_bench::{
    kubeproxy::{iptables, nftables},
    ns::{TempDir, TempNetns},
    scenario::Scenario,
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root (network namespaces)"
    );
}

#[test]
fn iptables_restore_accepts_one_service_two_endpoints() {
    require_root();
    let sc = Scenario::synthetic(1, 2, 10);
    let dir = TempDir::scratch("rules").unwrap();
    let hooks = dir.0.join("hooks");
    let rules = dir.0.join("rules");
    fs::write(&hooks, iptables::hooks()).unwrap();
    fs::write(&rules, iptables::restore(&sc, None, &[])).unwrap();
    for (restore, save) in [
        ("iptables-legacy-restore", "iptables-legacy-save"),
        ("iptables-nft-restore", "iptables-nft-save"),
    ] {
        let ns = TempNetns::new("rules").unwrap();
        ns.run_input(restore, &["--test", "--noflush"], &hooks)
            .unwrap_or_else(|e| panic!("{restore} --test hooks: {e}"));
        ns.run_input(restore, &["--noflush"], &hooks).unwrap();
        ns.run_input(restore, &["--test", "--noflush"], &rules)
            .unwrap_or_else(|e| panic!("{restore} --test: {e}"));
        ns.run_input(restore, &["--noflush"], &rules).unwrap();
        let saved = ns.run(save, &["-t", "nat"]).unwrap();
        assert_eq!(
            saved
                .lines()
                .filter(|l| l.starts_with(":KUBE-SEP-"))
                .count(),
            2,
            "{saved}"
        );
        assert_eq!(
            saved.matches("--probability 0.5").count(),
            1,
            "one statistic rule for two endpoints:\n{saved}"
        );
        assert_eq!(
            saved.matches("-j DNAT --to-destination 10.244.0.").count(),
            2,
            "{saved}"
        );
        assert!(
            saved.contains(
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            ),
            "{saved}"
        );
    }
}

#[test]
fn iptables_partial_sync_applies_on_top_of_a_full_one() {
    require_root();
    let before = Scenario::synthetic(20, 3, 40);
    let mut after = before.clone();
    let i = after.change_one(5);
    let gone = iptables::removed_seps(&before.services[i], &after.services[i]);
    let dir = TempDir::scratch("rules").unwrap();
    let (hooks, full, part) = (dir.0.join("h"), dir.0.join("f"), dir.0.join("p"));
    fs::write(&hooks, iptables::hooks()).unwrap();
    fs::write(&full, iptables::restore(&before, None, &[])).unwrap();
    fs::write(&part, iptables::restore(&after, Some(&[i]), &gone)).unwrap();
    let ns = TempNetns::new("rules").unwrap();
    for f in [&hooks, &full, &part] {
        ns.run_input("iptables-legacy-restore", &["--noflush"], f)
            .unwrap();
    }
    let saved = ns.run("iptables-legacy-save", &["-t", "nat"]).unwrap();
    assert_eq!(
        saved
            .lines()
            .filter(|l| l.starts_with(":KUBE-SEP-"))
            .count(),
        60
    );
    assert!(!saved.contains(&gone[0]), "removed chain still there");
    assert!(saved.contains("--to-destination 10.250.0.1:8080"));
}

#[test]
fn nft_accepts_full_and_change() {
    require_root();
    let before = Scenario::synthetic(3, 2, 10);
    let mut after = before.clone();
    after.change_one(1);
    let dir = TempDir::scratch("rules").unwrap();
    let (full, change) = (dir.0.join("full.nft"), dir.0.join("change.nft"));
    fs::write(&full, nftables::full(&before, "172.31.0.1")).unwrap();
    fs::write(
        &change,
        nftables::change(&before.services[1], &after.services[1]),
    )
    .unwrap();
    let ns = TempNetns::new("rules").unwrap();
    ns.run_input("nft", &["-c", "-f", "-"], &full)
        .unwrap_or_else(|e| panic!("nft -c: {e}"));
    ns.run_input("nft", &["-f", "-"], &full).unwrap();
    ns.run_input("nft", &["-f", "-"], &change).unwrap();
    let table = ns
        .run("nft", &["list", "table", "ip", "kube-proxy"])
        .unwrap();
    assert_eq!(table.matches("chain endpoint-").count(), 6, "{table}");
    assert!(table.contains("numgen random mod 2 vmap"), "{table}");
    assert!(table.contains("dnat to 10.250.0.1:8080"), "{table}");
    assert!(
        table.contains("10.96.0.2 . tcp . 80 : goto service-"),
        "{table}"
    );
}
