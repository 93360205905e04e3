//! kube-proxy nftables mode: `nft -f` input for ClusterIP Services.
//!
//! Table `ip kube-proxy`: the `services` chain looks up `daddr . l4proto . dport` in the
//! `service-ips` verdict map, which jumps to `service-<hash>-ns/name/proto/port`; that chain
//! marks off-cluster sources for masquerade and picks an endpoint chain with
//! `numgen random mod N vmap`; `endpoint-<hash>-...` chains mark hairpin traffic and DNAT.

use std::fmt::Write as _;

use super::hash_prefix;
use crate::scenario::{
    CLUSTER_CIDR, NAMESPACE, PORT_NAME, SERVICE_CIDR, SERVICE_PORT, Scenario, Service,
};

pub const TABLE: &str = "ip kube-proxy";

/// `hash[:8]-name`, kube-proxy's `hashAndTruncate` (names here are far below the length limit).
fn hashed(name: &str) -> String {
    format!("{}-{name}", hash_prefix(name, 8))
}

pub fn service_chain(svc: &str, proto: &str) -> String {
    format!(
        "service-{}",
        hashed(&format!("{NAMESPACE}/{svc}/{proto}/{PORT_NAME}"))
    )
}

pub fn endpoint_chain(svc: &str, proto: &str, ip: &str, port: u16) -> String {
    format!(
        "endpoint-{}",
        hashed(&format!(
            "{NAMESPACE}/{svc}/{proto}/{PORT_NAME}__{ip}/{port}"
        ))
    )
}

/// Base objects of the table (kube-proxy's `setupNFTables`), for a node IP.
fn base(s: &mut String, node_ip: &str) {
    let t = TABLE;
    let _ = write!(
        s,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add chain {t} cluster-ips-check\n\
         add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}\n\
         add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}\n\
         add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}\n\
         add chain {t} filter-input {{ type filter hook input priority 0 ; }}\n\
         add chain {t} filter-output {{ type filter hook output priority 0 ; }}\n\
         add chain {t} firewall-check\n\
         add chain {t} mark-for-masquerade\n\
         add chain {t} masquerading\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {t} nodeport-endpoints-check\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         add chain {t} services\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n\
         add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add rule {t} filter-forward ct state new jump cluster-ips-check\n\
         add rule {t} filter-input ct state new jump nodeport-endpoints-check\n\
         add rule {t} filter-input ct state new jump service-endpoints-check\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add rule {t} filter-output-pre-dnat ct state new jump firewall-check\n\
         add rule {t} filter-output ct state new jump cluster-ips-check\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add rule {t} nat-output jump services\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add rule {t} nat-prerouting jump services\n\
         add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add rule {t} reject-chain reject\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add element {t} nodeport-ips {{ {node_ip} }}\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n"
    );
}

fn endpoint(s: &mut String, svc: &Service, ep: &std::net::SocketAddrV4) {
    let t = TABLE;
    let chain = endpoint_chain(&svc.name, "tcp", &ep.ip().to_string(), ep.port());
    let _ = write!(
        s,
        "add chain {t} {chain}\n\
         flush chain {t} {chain}\n\
         add rule {t} {chain} ip saddr {} jump mark-for-masquerade\n\
         add rule {t} {chain} meta l4proto tcp dnat to {ep}\n",
        ep.ip()
    );
}

/// The Service chain and its endpoint chains (`add` + `flush` first, as kube-proxy does, so the
/// same text also replaces them).
fn service(s: &mut String, svc: &Service) {
    let t = TABLE;
    let chain = service_chain(&svc.name, "tcp");
    // Chains a vmap jumps to must exist before the rule (kube-proxy adds every chain first).
    for ep in &svc.endpoints {
        let ep_chain = endpoint_chain(&svc.name, "tcp", &ep.ip().to_string(), ep.port());
        let _ = writeln!(s, "add chain {t} {ep_chain}");
    }
    let _ = write!(
        s,
        "add chain {t} {chain}\n\
         flush chain {t} {chain}\n\
         add rule {t} {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
         add rule {t} {chain} numgen random mod {} vmap {{ ",
        svc.cluster_ip,
        svc.endpoints.len()
    );
    for (i, ep) in svc.endpoints.iter().enumerate() {
        if i > 0 {
            s.push_str(" , ");
        }
        let _ = write!(
            s,
            "{i} : goto {}",
            endpoint_chain(&svc.name, "tcp", &ep.ip().to_string(), ep.port())
        );
    }
    s.push_str(" }\n");
    for ep in &svc.endpoints {
        endpoint(s, svc, ep);
    }
}

/// A full sync into an empty table.
pub fn full(sc: &Scenario, node_ip: &str) -> String {
    let mut s = String::with_capacity(sc.endpoint_count() * 330 + 8192);
    base(&mut s, node_ip);
    for svc in &sc.services {
        service(&mut s, svc);
        let _ = writeln!(
            s,
            "add element {TABLE} cluster-ips {{ {} }}",
            svc.cluster_ip
        );
        let _ = writeln!(
            s,
            "add element {TABLE} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {} }}",
            svc.cluster_ip,
            service_chain(&svc.name, "tcp")
        );
    }
    s
}

/// The transaction of a partial sync after Service `after`'s endpoints changed from `before`'s:
/// its chains are rewritten, chains of endpoints that left are deleted (map elements are
/// unchanged: the Service's ClusterIP still jumps to the same chain).
pub fn change(before: &Service, after: &Service) -> String {
    let mut s = String::new();
    service(&mut s, after);
    for ep in before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
    {
        let _ = writeln!(
            s,
            "delete chain {TABLE} {}",
            endpoint_chain(&before.name, "tcp", &ep.ip().to_string(), ep.port())
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        // kube-proxy's proxier_test.go: ns1/svc1/tcp/p80 → ULMVA6XW, its endpoint → 5OJB2KTY.
        assert_eq!(hashed("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            hashed("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn one_service_two_endpoints_has_kube_proxy_structure() {
        let sc = Scenario::synthetic(1, 2, 10);
        let text = full(&sc, "172.31.0.1");
        let svc = service_chain("svc-0", "tcp");
        let ep0 = endpoint_chain("svc-0", "tcp", "10.244.0.2", 8080);
        let ep1 = endpoint_chain("svc-0", "tcp", "10.244.0.3", 8080);
        assert!(svc.starts_with("service-") && svc.ends_with("-bench/svc-0/tcp/http"));
        assert!(ep0.ends_with("-bench/svc-0/tcp/http__10.244.0.2/8080"));
        for line in [
            format!(
                "add rule ip kube-proxy {svc} ip daddr 10.96.0.1 ip saddr != 10.244.0.0/14 jump mark-for-masquerade"
            ),
            format!(
                "add rule ip kube-proxy {svc} numgen random mod 2 vmap {{ 0 : goto {ep0} , 1 : goto {ep1} }}"
            ),
            format!("add rule ip kube-proxy {ep0} ip saddr 10.244.0.2 jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {ep1} meta l4proto tcp dnat to 10.244.0.3:8080"),
            "add element ip kube-proxy cluster-ips { 10.96.0.1 }".to_string(),
            format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.1 . tcp . 80 : goto {svc} }}"
            ),
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
                .to_string(),
            "add rule ip kube-proxy masquerading masquerade fully-random".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
    }

    #[test]
    fn change_rewrites_one_service_and_deletes_the_old_endpoint() {
        let before = Scenario::synthetic(3, 2, 10);
        let mut after = before.clone();
        after.change_one(1);
        let text = change(&before.services[1], &after.services[1]);
        assert_eq!(text.matches("flush chain").count(), 3);
        assert_eq!(text.matches("delete chain").count(), 1);
        assert!(!text.contains("svc-0/") && !text.contains("svc-2/"));
    }
}
