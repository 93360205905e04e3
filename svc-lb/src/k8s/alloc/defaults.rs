//! Defaulting and validation of a Service as the API server does them before it stores one
//! (`SetDefaults_Service`, `ValidateService`), for Services read from manifests, which no API
//! server has seen.
//!
//! Anything the API server would refuse is reported, at the smallest scope that keeps the rest
//! meaningful: a bad port loses that port (the Service's other ports are served), a bad
//! externalIP that address, a field that cannot apply is ignored; only a Service whose name,
//! type or addresses are unusable, or that has no valid port left, is skipped as a whole.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{Service, ServicePort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::AllocError;

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// A Service with the API server's defaults applied and what it refuses removed.
pub(super) struct Normalized {
    pub svc: Service,
    pub type_: ServiceType,
    /// `clusterIP: None`.
    pub headless: bool,
    /// Valid addresses of `spec.clusterIPs` (or `spec.clusterIP`), at most one per family.
    pub explicit_ips: Vec<IpAddr>,
    /// Indices (in the kept `spec.ports`) of ports whose explicit nodePort was refused here:
    /// they get none (not an allocated one instead: the user asked for a specific port).
    pub node_port_refused: BTreeSet<usize>,
    /// An explicit healthCheckNodePort was refused here.
    pub health_check_refused: bool,
    /// Problems that did not skip the Service.
    pub problems: Vec<AllocError>,
}

/// Skips the whole Service.
fn skip(field: impl Into<String>, reason: impl Into<String>) -> AllocError {
    AllocError::Invalid {
        field: field.into(),
        reason: reason.into(),
        effect: "Service skipped".into(),
    }
}

/// Defaults and validates `svc`. Err: the Service cannot be served at all.
pub(super) fn normalize(svc: &Service) -> Result<Normalized, AllocError> {
    let mut svc = svc.clone();
    let name = svc.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(skip("metadata.name", "required"));
    }
    if let Some(reason) = dns1035_label(&name) {
        return Err(skip(
            "metadata.name",
            format!("{name:?} is not a valid Service name: {reason}"),
        ));
    }
    if let Some(ns) = svc.metadata.namespace.as_deref().filter(|n| !n.is_empty())
        && let Some(reason) = dns1123_label(ns)
    {
        return Err(skip(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace: {reason}"),
        ));
    }
    let spec = svc.spec.get_or_insert_with(Default::default);
    let type_ = match spec.type_.as_deref() {
        None | Some("") | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(skip(
                "spec.type",
                format!(
                    "unsupported value {other:?} (ClusterIP, NodePort, LoadBalancer or \
                     ExternalName)"
                ),
            ));
        }
    };
    spec.type_ = Some(
        match type_ {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
        .into(),
    );
    let mut problems = Vec::new();
    if type_ == ServiceType::ExternalName {
        // A DNS alias: no addresses, no ports to allocate.
        return Ok(Normalized {
            svc,
            type_,
            headless: false,
            explicit_ips: Vec::new(),
            node_port_refused: BTreeSet::new(),
            health_check_refused: false,
            problems,
        });
    }

    let (headless, explicit_ips) = cluster_ips(spec)?;

    // Ports.
    let ports = spec.ports.take().unwrap_or_default();
    if ports.is_empty() && !headless {
        return Err(skip(
            "spec.ports",
            "required: a Service needs at least one port unless it is headless \
             (clusterIP: None)",
        ));
    }
    let multi = ports.len() > 1;
    let mut kept: Vec<ServicePort> = Vec::new();
    let mut names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    let mut seen_node_ports = BTreeSet::new();
    let mut node_port_refused = BTreeSet::new();
    for (i, mut p) in ports.into_iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let label = match p.name.as_deref() {
            Some(n) if !n.is_empty() => format!("port {n:?}"),
            _ => format!("port {}", p.port),
        };
        let skipped = if multi {
            format!("{label} skipped, the Service's other ports are served")
        } else {
            format!("{label} skipped")
        };
        let mut bad = |field: &str, reason: String| {
            problems.push(AllocError::Invalid {
                field: format!("{path}.{field}"),
                reason,
                effect: skipped.clone(),
            });
        };
        // Name: required and unique when there are several ports (endpoints are matched to
        // Service ports by name), a DNS-1123 label when given.
        let name = p.name.clone().unwrap_or_default();
        if name.is_empty() && multi {
            bad(
                "name",
                "required: every port of a multi-port Service needs a name".into(),
            );
            continue;
        }
        if !name.is_empty() {
            if let Some(reason) = dns1123_label(&name) {
                bad("name", format!("{name:?} is not valid: {reason}"));
                continue;
            }
            if !names.insert(name.clone()) {
                bad("name", format!("duplicate port name {name:?}"));
                continue;
            }
        }
        if !(1..=65535).contains(&p.port) {
            bad("port", format!("{} is not in 1-65535", p.port));
            continue;
        }
        let protocol = match p.protocol.as_deref() {
            None | Some("") => "TCP",
            Some(proto @ ("TCP" | "UDP" | "SCTP")) => proto,
            Some(other) => {
                bad(
                    "protocol",
                    format!("unsupported value {other:?} (TCP, UDP or SCTP)"),
                );
                continue;
            }
        }
        .to_owned();
        p.protocol = Some(protocol.clone());
        if !seen_ports.insert((p.port, protocol.clone())) {
            bad(
                "port",
                format!("{}/{protocol} is already a port of this Service", p.port),
            );
            continue;
        }
        // targetPort: omitted, 0 or "" means `port`.
        match p.target_port.take() {
            None | Some(IntOrString::Int(0)) => {
                p.target_port = Some(IntOrString::Int(p.port));
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                p.target_port = Some(IntOrString::Int(p.port));
            }
            Some(IntOrString::Int(n)) if (1..=65535).contains(&n) => {
                p.target_port = Some(IntOrString::Int(n));
            }
            Some(IntOrString::Int(n)) => {
                bad("targetPort", format!("{n} is not in 1-65535"));
                continue;
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                // The API server refuses a quoted number (a port name needs a letter); svc-lb
                // has always read it as the number, so it still does, and says so.
                Ok(n) if (1..=65535).contains(&n) => {
                    problems.push(AllocError::Invalid {
                        field: format!("{path}.targetPort"),
                        reason: format!(
                            "{s:?} is a string, which the API server refuses (a named port \
                             needs a letter)"
                        ),
                        effect: format!("read as the number {n}"),
                    });
                    p.target_port = Some(IntOrString::Int(n));
                }
                Ok(n) => {
                    bad("targetPort", format!("{n} is not in 1-65535"));
                    continue;
                }
                Err(_) => {
                    if let Some(reason) = iana_svc_name(&s) {
                        bad(
                            "targetPort",
                            format!("{s:?} is not a valid port name: {reason}"),
                        );
                        continue;
                    }
                    p.target_port = Some(IntOrString::String(s));
                }
            },
        }
        // nodePort: 0 means "allocate one"; only NodePort and LoadBalancer Services have any.
        match p.node_port {
            None | Some(0) => p.node_port = None,
            Some(_) if type_ == ServiceType::ClusterIp => {
                problems.push(AllocError::Invalid {
                    field: format!("{path}.nodePort"),
                    reason: "may not be used when type is ClusterIP".into(),
                    effect: "ignored".into(),
                });
                p.node_port = None;
            }
            Some(np) if !(1..=65535).contains(&np) => {
                problems.push(AllocError::Invalid {
                    field: format!("{path}.nodePort"),
                    reason: format!("{np} is not in 1-65535"),
                    effect: format!("no NodePort frontend for {label}"),
                });
                p.node_port = None;
                node_port_refused.insert(kept.len());
            }
            Some(np) => {
                if !seen_node_ports.insert((np, protocol.clone())) {
                    problems.push(AllocError::Invalid {
                        field: format!("{path}.nodePort"),
                        reason: format!(
                            "{np}/{protocol} is already used by another port of this Service"
                        ),
                        effect: format!("no NodePort frontend for {label}"),
                    });
                    p.node_port = None;
                    node_port_refused.insert(kept.len());
                }
            }
        }
        kept.push(p);
    }
    if kept.is_empty() && !headless {
        return Err(skip("spec.ports", "no valid port left"));
    }
    spec.ports = (!kept.is_empty()).then_some(kept);

    // externalIPs: each must be an IP address.
    if let Some(ips) = spec.external_ips.take() {
        let mut valid = Vec::new();
        for (i, ip) in ips.into_iter().enumerate() {
            match ip.trim().parse::<IpAddr>() {
                Ok(addr) if usable_service_address(addr) => {
                    if !valid.contains(&addr.to_string()) {
                        valid.push(addr.to_string());
                    }
                }
                Ok(_) => problems.push(AllocError::Invalid {
                    field: format!("spec.externalIPs[{i}]"),
                    reason: format!("{ip} cannot be a Service address"),
                    effect: "that address is skipped".into(),
                }),
                Err(_) => problems.push(AllocError::Invalid {
                    field: format!("spec.externalIPs[{i}]"),
                    reason: format!("{ip:?} is not an IP address"),
                    effect: "that address is skipped".into(),
                }),
            }
        }
        spec.external_ips = (!valid.is_empty()).then_some(valid);
    }

    // The API server's other defaults, so that what views show matches a cluster.
    if spec.session_affinity.as_deref().is_none_or(str::is_empty) {
        spec.session_affinity = Some("None".into());
    }
    if spec
        .internal_traffic_policy
        .as_deref()
        .is_none_or(str::is_empty)
    {
        spec.internal_traffic_policy = Some("Cluster".into());
    }
    let external = matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer);
    if external
        && spec
            .external_traffic_policy
            .as_deref()
            .is_none_or(str::is_empty)
    {
        spec.external_traffic_policy = Some("Cluster".into());
    }
    if type_ == ServiceType::LoadBalancer && spec.allocate_load_balancer_node_ports.is_none() {
        spec.allocate_load_balancer_node_ports = Some(true);
    }
    let needs_health_check = type_ == ServiceType::LoadBalancer
        && spec.external_traffic_policy.as_deref() == Some("Local");
    let mut health_check_refused = false;
    match spec.health_check_node_port {
        None | Some(0) => spec.health_check_node_port = None,
        Some(_) if !needs_health_check => {
            problems.push(AllocError::Invalid {
                field: "spec.healthCheckNodePort".into(),
                reason: "may only be set when type is LoadBalancer and \
                         externalTrafficPolicy is Local"
                    .into(),
                effect: "ignored".into(),
            });
            spec.health_check_node_port = None;
        }
        Some(np) if !(1..=65535).contains(&np) => {
            problems.push(AllocError::Invalid {
                field: "spec.healthCheckNodePort".into(),
                reason: format!("{np} is not in 1-65535"),
                effect: "no health check node port".into(),
            });
            spec.health_check_node_port = None;
            health_check_refused = true;
        }
        Some(_) => {}
    }
    Ok(Normalized {
        svc,
        type_,
        headless,
        explicit_ips,
        node_port_refused,
        health_check_refused,
        problems,
    })
}

/// `spec.clusterIP` / `spec.clusterIPs`: `(headless, addresses)`.
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<(bool, Vec<IpAddr>), AllocError> {
    let single = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let list: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let (Some(ip), Some(first)) = (single, list.first())
        && ip != *first
    {
        return Err(skip(
            "spec.clusterIPs[0]",
            format!("{first:?} must be the same as spec.clusterIP ({ip:?})"),
        ));
    }
    let given: Vec<&str> = if list.is_empty() {
        single.into_iter().collect()
    } else {
        list
    };
    if given.first() == Some(&"None") {
        if given.len() > 1 {
            return Err(skip(
                "spec.clusterIPs",
                "\"None\" must be the only value of a headless Service",
            ));
        }
        return Ok((true, Vec::new()));
    }
    if given.len() > 2 {
        return Err(skip(
            "spec.clusterIPs",
            format!(
                "at most two addresses (one per IP family), got {}",
                given.len()
            ),
        ));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, s) in given.iter().enumerate() {
        let ip: IpAddr = s.trim().parse().map_err(|_| {
            skip(
                format!("spec.clusterIPs[{i}]"),
                format!("{s:?} is not an IP address (or None)"),
            )
        })?;
        if !usable_service_address(ip) {
            return Err(skip(
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} cannot be a Service address"),
            ));
        }
        if ips.iter().any(|p| p.is_ipv4() == ip.is_ipv4()) {
            return Err(skip(
                "spec.clusterIPs",
                "the two addresses must be of different IP families",
            ));
        }
        ips.push(ip);
    }
    Ok((false, ips))
}

/// Not unspecified, loopback, multicast, link-local or broadcast (the API server refuses
/// those as Service addresses).
fn usable_service_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// Why `s` is not an RFC 1123 label (lowercase alphanumerics and '-', starting and ending
/// with an alphanumeric, at most 63 characters), or None.
pub(super) fn dns1123_label(s: &str) -> Option<&'static str> {
    label(s, false)
}

/// Why `s` is not an RFC 1035 label (as RFC 1123, and starting with a letter), or None.
pub(super) fn dns1035_label(s: &str) -> Option<&'static str> {
    label(s, true)
}

fn label(s: &str, letter_first: bool) -> Option<&'static str> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return Some("must be 1-63 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Some("only lowercase letters, digits and '-' are allowed");
    }
    if letter_first && !b[0].is_ascii_lowercase() {
        return Some("must start with a lowercase letter");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Some("must start and end with a letter or digit");
    }
    None
}

/// Why `s` is not an IANA service name (a container port name: at most 15 lowercase letters,
/// digits and '-', at least one letter, no '-' at either end or twice in a row), or None.
pub(super) fn iana_svc_name(s: &str) -> Option<&'static str> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 15 {
        return Some("must be 1-15 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Some("only lowercase letters, digits and '-' are allowed");
    }
    if !b.iter().any(u8::is_ascii_lowercase) {
        return Some("must contain at least one letter");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' || s.contains("--") {
        return Some("'-' may not start or end it, or appear twice in a row");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(dns1035_label("frontend-svc"), None);
        assert!(dns1035_label("1abc").is_some());
        assert!(dns1035_label("Web").is_some());
        assert!(dns1035_label("web-").is_some());
        assert!(dns1035_label(&"a".repeat(64)).is_some());
        assert_eq!(dns1035_label(&"a".repeat(63)), None);
        assert_eq!(dns1123_label("1abc"), None);
        assert!(dns1123_label("a_b").is_some());
        assert_eq!(iana_svc_name("http"), None);
        assert_eq!(iana_svc_name("h2c-8080"), None);
        assert!(iana_svc_name("8080").is_some());
        assert!(iana_svc_name("a--b").is_some());
        assert!(iana_svc_name("-a").is_some());
        assert!(iana_svc_name("abcdefghijklmnop").is_some());
    }
}
