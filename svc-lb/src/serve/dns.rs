//! The optional DNS responder (`svc-lb run --dns-listen ADDR`): answers for
//! `<service>.<namespace>.svc.<cluster domain>` following the Kubernetes DNS specification,
//! from the objects the agent last read:
//! - ClusterIP Service: `A` with the cluster IP;
//! - headless Service: `A` with the ready endpoint addresses, and
//!   `<hostname or a-b-c-d>.<service>.<namespace>.svc.<domain>` per endpoint;
//! - ExternalName Service: `CNAME` to the external name (not followed: no recursion);
//! - named ports: `SRV` at `_<port>._<proto>.<service>.<namespace>.svc.<domain>` (one per
//!   endpoint for headless Services), with the target's `A` records as additionals.
//!
//! Authoritative for the cluster domain only: names in it that do not exist get NXDOMAIN
//! (with the zone's SOA, so resolvers cache the negative answer), names outside it REFUSED.
//! IPv4 only, like the datapath: `AAAA` queries get an empty NOERROR answer. UDP, and TCP for
//! answers too large for the client's UDP buffer.
//! Messages are parsed and encoded with hickory-proto.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, CNAME, SOA, SRV},
    },
};
use k8s_openapi::api::{
    core::v1::{Pod, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
};
use tracing::debug;

use crate::k8s::{manifest::Objects, namespace, selector};

/// Answers may be cached this long (CoreDNS's kubernetes plugin default).
pub const TTL: u32 = 5;
/// Largest UDP answer to a query without EDNS (RFC 1035).
const PLAIN_UDP_MAX: usize = 512;

/// One endpoint of a headless Service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    ip: Ipv4Addr,
    /// `hostname` of the endpoint; else the address with dashes (`10-244-1-2`).
    label: String,
    /// Port name → port number on this endpoint.
    ports: BTreeMap<String, u16>,
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

fn svc_ports(svc: &Service) -> &[ServicePort] {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
}

/// Ready IPv4 endpoints of a headless Service: from its EndpointSlices, or, when it has none
/// (manifest mode without slices), from the Pods its selector picks.
fn endpoints(objects: &Objects, svc: &Service) -> Vec<Endpoint> {
    let ns = namespace(&svc.metadata);
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let slices: Vec<&EndpointSlice> = objects
        .endpoint_slices
        .iter()
        .filter(|s| namespace(&s.metadata) == ns && s.address_type == "IPv4")
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .is_some_and(|n| n == name)
        })
        .collect();
    let mut out: Vec<Endpoint> = Vec::new();
    if !slices.is_empty() {
        for s in slices {
            let ports: BTreeMap<String, u16> = s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect();
            for e in &s.endpoints {
                // API docs: a nil `ready` means ready.
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                let Some(ip) = e.addresses.first().and_then(|a| a.parse().ok()) else {
                    continue;
                };
                let label = e.hostname.clone().unwrap_or_else(|| dashed(ip));
                out.push(Endpoint {
                    ip,
                    label,
                    ports: ports.clone(),
                });
            }
        }
    } else {
        for pod in objects.pods.iter().filter(|p| selector::selects(svc, p)) {
            if let Some(e) = pod_endpoint(svc, pod) {
                out.push(e);
            }
        }
    }
    out.sort_by_key(|e| e.ip);
    out.dedup_by_key(|e| e.ip);
    out
}

fn pod_endpoint(svc: &Service, pod: &Pod) -> Option<Endpoint> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let not_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "False");
    if not_ready {
        return None;
    }
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let spec = pod.spec.as_ref();
    let name = svc.metadata.name.as_deref();
    // A pod's hostname names it under the Service only if its subdomain is that Service.
    let label = spec
        .filter(|s| s.subdomain.as_deref() == name)
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| dashed(ip));
    let ports = svc_ports(svc)
        .iter()
        .map(|p| {
            let target = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    u16::try_from(*n).ok()
                }
                _ => None,
            };
            (
                p.name.clone().unwrap_or_default(),
                target.or(u16::try_from(p.port).ok()).unwrap_or(0),
            )
        })
        .collect();
    Some(Endpoint { ip, label, ports })
}

/// What a query resolves to.
#[derive(Debug, Default)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// SOA for negative answers.
    pub authority: Vec<Record>,
}

fn a(name: &Name, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), TTL, RData::A(A(ip)))
}

/// The zone's SOA (for negative answers).
fn soa(zone: &Name) -> Record {
    let mname = Name::from_ascii("ns.dns").and_then(|n| n.append_domain(zone));
    let rname = Name::from_ascii("hostmaster").and_then(|n| n.append_domain(zone));
    let (mname, rname) = (
        mname.unwrap_or_else(|_| zone.clone()),
        rname.unwrap_or_else(|_| zone.clone()),
    );
    Record::from_rdata(
        zone.clone(),
        TTL,
        RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL)),
    )
}

/// Builds `<labels...>.<zone>`.
fn child(zone: &Name, labels: &[&str]) -> Option<Name> {
    Name::from_labels(labels.iter().map(|l| l.as_bytes()))
        .ok()?
        .append_domain(zone)
        .ok()
}

/// Resolves one question against `objects`. `zone` is `svc.<cluster domain>.` (FQDN).
pub fn resolve(objects: &Objects, zone: &Name, qname: &Name, qtype: RecordType) -> Answer {
    let mut ans = Answer::default();
    let lower = qname.to_lowercase();
    if !zone.zone_of(&lower) {
        ans.rcode = ResponseCode::Refused;
        return ans;
    }
    // Labels below the zone, leftmost first: [.., service, namespace].
    let below: Vec<String> = lower
        .iter()
        .take(lower.num_labels().saturating_sub(zone.num_labels()) as usize)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let nxdomain = |mut ans: Answer| {
        ans.rcode = ResponseCode::NXDomain;
        ans.authority.push(soa(zone));
        ans
    };
    let nodata = |mut ans: Answer| {
        ans.authority.push(soa(zone));
        ans
    };
    let find = |ns: &str, name: &str| {
        objects
            .services
            .iter()
            .find(|s| namespace(&s.metadata) == ns && s.metadata.name.as_deref() == Some(name))
    };
    match below.as_slice() {
        // The zone itself and namespaces are empty non-terminals: they exist, without data.
        [] => {
            if qtype == RecordType::SOA {
                ans.answers.push(soa(zone));
                return ans;
            }
            nodata(ans)
        }
        [ns] if objects
            .services
            .iter()
            .any(|s| namespace(&s.metadata) == ns) =>
        {
            nodata(ans)
        }
        [name, ns] => {
            let Some(svc) = find(ns, name) else {
                return nxdomain(ans);
            };
            let spec = svc.spec.as_ref();
            if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
                let target = spec
                    .and_then(|s| s.external_name.as_deref())
                    .and_then(|n| Name::from_ascii(n).ok());
                if let Some(mut target) = target {
                    target.set_fqdn(true);
                    ans.answers.push(Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::CNAME(CNAME(target)),
                    ));
                }
                return ans;
            }
            if qtype != RecordType::A && qtype != RecordType::ANY {
                return nodata(ans);
            }
            match spec.and_then(|s| s.cluster_ip.as_deref()) {
                Some("None") => {
                    for e in endpoints(objects, svc) {
                        ans.answers.push(a(qname, e.ip));
                    }
                }
                Some(ip) => {
                    if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                        ans.answers.push(a(qname, ip));
                    }
                }
                None => {}
            }
            if ans.answers.is_empty() {
                return nodata(ans);
            }
            ans
        }
        [host, name, ns] if !host.starts_with('_') => {
            let Some(svc) = find(ns, name) else {
                return nxdomain(ans);
            };
            let Some(e) = endpoints(objects, svc)
                .into_iter()
                .find(|e| &e.label == host)
            else {
                return nxdomain(ans);
            };
            if qtype == RecordType::A || qtype == RecordType::ANY {
                ans.answers.push(a(qname, e.ip));
                ans
            } else {
                nodata(ans)
            }
        }
        [port, proto, name, ns] if port.starts_with('_') && proto.starts_with('_') => {
            let (port, proto) = (&port[1..], &proto[1..]);
            let Some(svc) = find(ns, name) else {
                return nxdomain(ans);
            };
            let Some(sp) = svc_ports(svc).iter().find(|p| {
                p.name.as_deref() == Some(port)
                    && p.protocol
                        .as_deref()
                        .unwrap_or("TCP")
                        .eq_ignore_ascii_case(proto)
            }) else {
                return nxdomain(ans);
            };
            if qtype != RecordType::SRV && qtype != RecordType::ANY {
                return nodata(ans);
            }
            match svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) {
                Some("None") => {
                    for e in endpoints(objects, svc) {
                        let Some(target) = child(zone, &[&e.label, name, ns]) else {
                            continue;
                        };
                        let p = e.ports.get(port).copied().unwrap_or(sp.port as u16);
                        ans.answers.push(Record::from_rdata(
                            qname.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, 100, p, target.clone())),
                        ));
                        ans.additionals.push(a(&target, e.ip));
                    }
                }
                Some(ip) => {
                    if let (Some(target), Ok(ip)) = (child(zone, &[name, ns]), ip.parse()) {
                        ans.answers.push(Record::from_rdata(
                            qname.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, 100, sp.port as u16, target.clone())),
                        ));
                        ans.additionals.push(a(&target, ip));
                    }
                }
                None => {}
            }
            ans
        }
        _ => nxdomain(ans),
    }
}

/// Answers one DNS message received over UDP; `None` for garbage without even a header.
pub fn respond(request: &[u8], objects: &Objects, zone: &Name) -> Option<Vec<u8>> {
    respond_within(request, objects, zone, Transport::Udp)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Answers must fit the client's buffer (512 bytes, or its EDNS size), else TC is set.
    Udp,
    /// Up to 65535 bytes: where clients retry truncated answers.
    Tcp,
}

fn respond_within(
    request: &[u8],
    objects: &Objects,
    zone: &Name,
    transport: Transport,
) -> Option<Vec<u8>> {
    let req = match Message::from_vec(request) {
        Ok(m) => m,
        Err(e) => {
            debug!("undecodable DNS query: {e}");
            // Echo the id back with FORMERR when at least the id is there.
            let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.authoritative = true;
    if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::NotImp;
        resp.queries = req.queries.clone();
        return resp.to_vec().ok();
    }
    let q = &req.queries[0];
    resp.queries = req.queries.clone();
    if q.query_class != DNSClass::IN {
        resp.metadata.response_code = ResponseCode::Refused;
        return resp.to_vec().ok();
    }
    let ans = resolve(objects, zone, &q.name, q.query_type);
    resp.metadata.authoritative = ans.rcode != ResponseCode::Refused;
    resp.metadata.response_code = ans.rcode;
    resp.answers = ans.answers;
    resp.authorities = ans.authority;
    resp.additionals = ans.additionals;
    if req.edns.is_some() {
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(1232);
        resp.edns = Some(edns);
    }
    let max = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => req.edns.as_ref().map_or(PLAIN_UDP_MAX, |e| {
            usize::from(e.max_payload()).max(PLAIN_UDP_MAX)
        }),
    };
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= max {
        return Some(bytes);
    }
    // Too big for the client's buffer: the header and question only, TC set (it retries
    // over TCP).
    let mut t = resp.truncate();
    t.metadata.truncation = true;
    t.to_vec().ok()
}

/// The zone `svc.<domain>.` for a cluster domain like `cluster.local`.
pub fn zone(cluster_domain: &str) -> Result<Name, String> {
    let mut n = Name::from_ascii(format!("svc.{}", cluster_domain.trim_end_matches('.')))
        .map_err(|e| format!("invalid cluster domain {cluster_domain:?}: {e}"))?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

/// Serves DNS over TCP (RFC 1035 4.2.2: each message preceded by its 16-bit length; several
/// per connection) until the runtime stops.
pub fn spawn_tcp(
    listener: TcpListener,
    zone: Name,
    objects: impl Fn() -> Arc<Objects> + Send + Sync + 'static,
) {
    let objects = Arc::new(objects);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let (zone, objects) = (zone.clone(), objects.clone());
            tokio::spawn(async move {
                // Idle connections are closed after a while, like other servers do.
                let idle = std::time::Duration::from_secs(10);
                loop {
                    let mut len = [0u8; 2];
                    match tokio::time::timeout(idle, conn.read_exact(&mut len)).await {
                        Ok(Ok(_)) => {}
                        _ => return,
                    }
                    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    let Some(reply) = respond_within(&msg, &objects(), &zone, Transport::Tcp)
                    else {
                        return;
                    };
                    let mut out = Vec::with_capacity(reply.len() + 2);
                    out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                    out.extend_from_slice(&reply);
                    if conn.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Serves DNS on `socket` until the runtime stops, answering from `objects()` at each query.
pub fn spawn(socket: UdpSocket, zone: Name, objects: impl Fn() -> Arc<Objects> + Send + 'static) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let objects = objects();
            if let Some(reply) = respond(&buf[..n], &objects, &zone) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, Query};

    use super::*;

    fn objects() -> Objects {
        let docs = "\
apiVersion: v1
kind: Service
metadata: {name: frontend-svc, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 5000}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 15432, protocol: TCP}]
endpoints:
- addresses: [10.244.2.7]
  hostname: db-0
- addresses: [10.244.1.9]
  conditions: {ready: true}
- addresses: [10.244.3.3]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec: {clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: pods}
spec: {clusterIP: None, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: pods, labels: {app: web}}
spec: {hostname: web-1, subdomain: web, containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.5.5}
";
        let mut o = Objects::default();
        for d in docs.split("\n---\n") {
            let v: serde_yaml::Value = serde_yaml::from_str(d).unwrap();
            match v["kind"].as_str().unwrap() {
                "Service" => o.services.push(serde_yaml::from_value(v).unwrap()),
                "EndpointSlice" => o.endpoint_slices.push(serde_yaml::from_value(v).unwrap()),
                "Pod" => o.pods.push(serde_yaml::from_value(v).unwrap()),
                k => panic!("{k}"),
            }
        }
        o
    }

    fn ask(name: &str, qtype: RecordType, edns: bool) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            q.set_edns(Edns::new());
        }
        let zone = zone("cluster.local").unwrap();
        let reply = respond(&q.to_vec().unwrap(), &objects(), &zone).expect("a reply");
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.queries, q.queries);
        m
    }

    /// Answers as `dig +short` would print them.
    fn short(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn clusterip_a_and_srv() {
        let m = ask(
            "frontend-svc.default.svc.cluster.local.",
            RecordType::A,
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(short(&m.answers), ["10.96.0.10"]);
        assert_eq!(m.answers[0].ttl, TTL);
        // Case-insensitive, answered with the name as asked.
        let m = ask(
            "Frontend-Svc.DEFAULT.svc.cluster.local.",
            RecordType::A,
            false,
        );
        assert_eq!(
            m.answers[0].name.to_ascii(),
            "Frontend-Svc.DEFAULT.svc.cluster.local."
        );
        let m = ask(
            "_http._tcp.frontend-svc.default.svc.cluster.local.",
            RecordType::SRV,
            true,
        );
        assert_eq!(
            short(&m.answers),
            ["0 100 80 frontend-svc.default.svc.cluster.local."]
        );
        assert_eq!(short(&m.additionals), ["10.96.0.10"]);
        let m = ask(
            "_dns._udp.dns.kube-system.svc.cluster.local.",
            RecordType::SRV,
            false,
        );
        assert_eq!(
            short(&m.answers),
            ["0 100 53 dns.kube-system.svc.cluster.local."]
        );
        // Wrong protocol or unnamed port: no such name.
        let m = ask(
            "_dns._tcp.dns.kube-system.svc.cluster.local.",
            RecordType::SRV,
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // AAAA of an IPv4 Service: exists, no data, SOA for negative caching.
        let m = ask(
            "frontend-svc.default.svc.cluster.local.",
            RecordType::AAAA,
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn headless_endpoints_and_their_names() {
        let m = ask("db.shop.svc.cluster.local.", RecordType::A, false);
        // Ready endpoints only, in address order.
        assert_eq!(short(&m.answers), ["10.244.1.9", "10.244.2.7"]);
        let m = ask(
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV,
            false,
        );
        assert_eq!(
            short(&m.answers),
            [
                "0 100 15432 10-244-1-9.db.shop.svc.cluster.local.",
                "0 100 15432 db-0.db.shop.svc.cluster.local."
            ]
        );
        assert_eq!(short(&m.additionals), ["10.244.1.9", "10.244.2.7"]);
        let m = ask("db-0.db.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(short(&m.answers), ["10.244.2.7"]);
        let m = ask(
            "10-244-1-9.db.shop.svc.cluster.local.",
            RecordType::A,
            false,
        );
        assert_eq!(short(&m.answers), ["10.244.1.9"]);
        let m = ask(
            "10-244-3-3.db.shop.svc.cluster.local.",
            RecordType::A,
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Without slices, from the Pods the selector picks (hostname + subdomain).
        let m = ask("web.pods.svc.cluster.local.", RecordType::A, false);
        assert_eq!(short(&m.answers), ["10.244.5.5"]);
        let m = ask("web-1.web.pods.svc.cluster.local.", RecordType::A, false);
        assert_eq!(short(&m.answers), ["10.244.5.5"]);
        let m = ask(
            "_http._tcp.web.pods.svc.cluster.local.",
            RecordType::SRV,
            false,
        );
        assert_eq!(
            short(&m.answers),
            ["0 100 8080 web-1.web.pods.svc.cluster.local."]
        );
    }

    #[test]
    fn external_name_nxdomain_and_refused() {
        let m = ask("ext.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(short(&m.answers), ["db.example.com."]);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        let m = ask("nope.shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        // Namespaces and the zone exist without data.
        let m = ask("shop.svc.cluster.local.", RecordType::A, false);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let m = ask("svc.cluster.local.", RecordType::SOA, false);
        assert_eq!(m.answers[0].record_type(), RecordType::SOA);
        let m = ask("example.com.", RecordType::A, false);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);
    }

    #[test]
    fn garbage_and_truncation() {
        let zone = zone("cluster.local").unwrap();
        assert_eq!(respond(&[0x12], &objects(), &zone), None);
        let formerr =
            Message::from_vec(&respond(&[0xab, 0xcd, 0xff], &objects(), &zone).unwrap()).unwrap();
        assert_eq!(formerr.metadata.id, 0xabcd);
        assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
        // 60 headless endpoints do not fit 512 bytes without EDNS.
        let mut o = objects();
        let slice = &mut o.endpoint_slices[0];
        for i in 0..60 {
            let mut e = slice.endpoints[1].clone();
            e.addresses = vec![format!("10.244.9.{i}")];
            slice.endpoints.push(e);
        }
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("db.shop.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let m = Message::from_vec(&respond(&q.to_vec().unwrap(), &o, &zone).unwrap()).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        q.set_edns({
            let mut e = Edns::new();
            e.set_max_payload(4096);
            e
        });
        let m = Message::from_vec(&respond(&q.to_vec().unwrap(), &o, &zone).unwrap()).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 62);
        // Over TCP the whole answer fits without EDNS.
        q.edns = None;
        let tcp = respond_within(&q.to_vec().unwrap(), &o, &zone, Transport::Tcp).unwrap();
        let m = Message::from_vec(&tcp).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 62);
    }
}
