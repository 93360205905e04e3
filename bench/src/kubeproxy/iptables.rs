//! kube-proxy iptables mode: `iptables-restore --noflush` input for ClusterIP Services.
//!
//! Per Service port: a `KUBE-SERVICES` rule matching the ClusterIP jumps to `KUBE-SVC-<hash>`,
//! which marks off-cluster sources for masquerade and picks an endpoint with
//! `-m statistic --mode random --probability 1/(n-i)` rules; each `KUBE-SEP-<hash>` marks
//! hairpin traffic and DNATs. `KUBE-POSTROUTING` masquerades marked packets. Above 1000
//! endpoint chains kube-proxy runs in "large cluster mode" and drops the per-endpoint comments;
//! so does this generator.

use std::fmt::Write as _;

use super::hash_prefix;
use crate::scenario::{CLUSTER_CIDR, SERVICE_PORT, Scenario, Service};

pub const MASQ_MARK: &str = "0x4000";
/// kube-proxy's `largeClusterEndpointsThreshold`.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// `KUBE-SVC-` + base32(sha256(servicePortName + protocol))[:16].
pub fn svc_chain(port_name: &str, proto: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_prefix(&format!("{port_name}{proto}"), 16)
    )
}

/// `KUBE-SEP-` + base32(sha256(servicePortName + protocol + endpoint))[:16].
pub fn sep_chain(port_name: &str, proto: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_prefix(&format!("{port_name}{proto}{endpoint}"), 16)
    )
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The jumps from the built-in chains that kube-proxy installs (with `iptables -I`) before its
/// first restore. Loaded once, untimed.
pub fn hooks() -> String {
    let mut s = String::new();
    s.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         COMMIT\n*nat\n",
    );
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         COMMIT\n",
    );
    s
}

fn filter_table(s: &mut String) {
    s.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let _ = write!(
        s,
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n"
    );
}

/// The chains and rules of one Service port (`KUBE-SVC-*` and its `KUBE-SEP-*`).
fn service_chains(decl: &mut String, rules: &mut String, svc: &Service, large: bool) {
    let name = svc.port_name();
    let svc_chain = svc_chain(&name, "tcp");
    let _ = writeln!(decl, ":{svc_chain} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        svc.cluster_ip
    );
    let n = svc.endpoints.len();
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let sep = sep_chain(&name, "tcp", &ep.to_string());
        let _ = write!(rules, "-A {svc_chain}");
        if !large {
            let _ = write!(rules, " -m comment --comment \"{name} -> {ep}\"");
        }
        if i < n - 1 {
            let _ = write!(
                rules,
                " -m statistic --mode random --probability {}",
                probability(n - i)
            );
        }
        let _ = writeln!(rules, " -j {sep}");
    }
    for ep in &svc.endpoints {
        let sep = sep_chain(&name, "tcp", &ep.to_string());
        let _ = writeln!(decl, ":{sep} - [0:0]");
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        let _ = writeln!(rules, "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ", ep.ip());
        let _ = writeln!(
            rules,
            "-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination {ep}"
        );
    }
}

/// The whole ruleset of a full sync. `only` limits the `KUBE-SVC-*`/`KUBE-SEP-*` chains written
/// to the Services with these indexes (a partial sync: kube-proxy always rewrites its top-level
/// chains, `KUBE-SERVICES` with one rule per Service included, but only the chains of changed
/// Services). `removed` are chains to delete (endpoints that went away).
pub fn restore(sc: &Scenario, only: Option<&[usize]>, removed: &[String]) -> String {
    let large = sc.endpoint_count() > LARGE_CLUSTER_ENDPOINTS;
    let mut s = String::with_capacity(sc.endpoint_count() * 260 + 4096);
    filter_table(&mut s);
    let mut decl = String::new();
    let mut rules = String::new();
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(decl, ":{c} - [0:0]");
    }
    let _ = write!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n"
    );
    for svc in &sc.services {
        let name = svc.port_name();
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {SERVICE_PORT} -j {}",
            svc.cluster_ip,
            svc_chain(&name, "tcp")
        );
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    match only {
        None => {
            for svc in &sc.services {
                service_chains(&mut decl, &mut rules, svc, large);
            }
        }
        Some(idx) => {
            for &i in idx {
                service_chains(&mut decl, &mut rules, &sc.services[i], large);
            }
        }
    }
    for c in removed {
        let _ = writeln!(decl, ":{c} - [0:0]");
        let _ = writeln!(rules, "-X {c}");
    }
    s.push_str("*nat\n");
    s.push_str(&decl);
    s.push_str(&rules);
    s.push_str("COMMIT\n");
    s
}

/// The `KUBE-SEP-*` chains of `before`'s Service `i` that `after` no longer has.
pub fn removed_seps(before: &Service, after: &Service) -> Vec<String> {
    let name = before.port_name();
    before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
        .map(|e| sep_chain(&name, "tcp", &e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names from kube-proxy's proxier_test.go for ns1/svc1:p80 and endpoint 10.180.0.1:80.
        assert_eq!(
            svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn probabilities_are_one_over_remaining() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
    }

    #[test]
    fn one_service_two_endpoints_has_kube_proxy_structure() {
        let sc = Scenario::synthetic(1, 2, 10);
        let text = restore(&sc, None, &[]);
        let svc = svc_chain("bench/svc-0:http", "tcp");
        let sep0 = sep_chain("bench/svc-0:http", "tcp", "10.244.0.2:8080");
        let sep1 = sep_chain("bench/svc-0:http", "tcp", "10.244.0.3:8080");
        let nat: Vec<&str> = text
            .split("*nat\n")
            .nth(1)
            .unwrap()
            .lines()
            .filter(|l| l.contains("KUBE-SVC-") || l.contains("KUBE-SEP-"))
            .collect();
        let expected = vec![
            format!(":{svc} - [0:0]"),
            format!(":{sep0} - [0:0]"),
            format!(":{sep1} - [0:0]"),
            format!(
                "-A KUBE-SERVICES -m comment --comment \"bench/svc-0:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j {svc}"
            ),
            format!(
                "-A {svc} -m comment --comment \"bench/svc-0:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 ! -s 10.244.0.0/14 -j KUBE-MARK-MASQ"
            ),
            format!(
                "-A {svc} -m comment --comment \"bench/svc-0:http -> 10.244.0.2:8080\" -m statistic --mode random --probability 0.5000000000 -j {sep0}"
            ),
            format!(
                "-A {svc} -m comment --comment \"bench/svc-0:http -> 10.244.0.3:8080\" -j {sep1}"
            ),
            format!(
                "-A {sep0} -m comment --comment bench/svc-0:http -s 10.244.0.2 -j KUBE-MARK-MASQ"
            ),
            format!(
                "-A {sep0} -m comment --comment bench/svc-0:http -m tcp -p tcp -j DNAT --to-destination 10.244.0.2:8080"
            ),
            format!(
                "-A {sep1} -m comment --comment bench/svc-0:http -s 10.244.0.3 -j KUBE-MARK-MASQ"
            ),
            format!(
                "-A {sep1} -m comment --comment bench/svc-0:http -m tcp -p tcp -j DNAT --to-destination 10.244.0.3:8080"
            ),
        ];
        assert_eq!(nat, expected);
        assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"));
        assert!(text.contains("-m mark ! --mark 0x4000/0x4000 -j RETURN"));
        assert!(text.ends_with("-j KUBE-NODEPORTS\n") || text.ends_with("COMMIT\n"));
        assert_eq!(text.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let sc = Scenario::synthetic(101, 10, 500);
        let text = restore(&sc, None, &[]);
        let sep_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SEP-"))
            .collect();
        assert_eq!(sep_rules.len(), 2 * 1010);
        assert!(sep_rules.iter().all(|l| !l.contains("--comment")));
        assert_eq!(
            text.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
            1010
        );
    }

    #[test]
    fn partial_sync_writes_all_service_rules_but_one_service_chains() {
        let before = Scenario::synthetic(50, 3, 1000);
        let mut after = before.clone();
        after.change_one(7);
        let gone = removed_seps(&before.services[7], &after.services[7]);
        assert_eq!(gone.len(), 1);
        let text = restore(&after, Some(&[7]), &gone);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            51
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with(":KUBE-SVC-")).count(),
            1
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
            4
        );
        assert!(text.contains(&format!("-X {}\n", gone[0])));
    }
}
