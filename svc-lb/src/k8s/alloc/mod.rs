//! Standalone mode's small API server: what kube-apiserver does to a Service before anything
//! sees it. Services read from manifests get the API server's defaults and validation
//! ([`defaults`]), a ClusterIP from `--service-cidr` ([`cluster_ip`]), node ports from
//! `--nodeport-range` for NodePort and LoadBalancer Services and a `healthCheckNodePort` for
//! LoadBalancers with `externalTrafficPolicy: Local` ([`node_port`]).
//!
//! # Stability
//!
//! - Deterministic: a dynamic value starts at a hash of the Service's namespace/name (and port)
//!   and probes upwards, and Services are handled in a fixed order (creationTimestamp, then
//!   when first seen, then namespace/name), never in file or event order. Every node given
//!   the same manifests computes the same addresses.
//! - Recorded: what each Service holds is kept in a [`Record`] that the agent saves across
//!   restarts, so a Service keeps its values while it exists, even if a colliding Service
//!   appears or the ranges change. Omitting a value that was allocated (or given) before keeps
//!   it, like kube-apiserver's `patchAllocatedValues`; a Service that disappears from the
//!   manifests releases everything. A Service still in the manifests but invalid for now
//!   keeps its values reserved (kube-apiserver would refuse the bad update and keep the old
//!   object).
//!
//! # First owner keeps it
//!
//! A ClusterIP, a node port and an externalIP:port/protocol belong to one Service. When two
//! ask for the same one, the one that had it (per the record) keeps it; else the one with the
//! earlier creationTimestamp; else the one seen first; else the first by namespace/name. The
//! other gets a [`Problem`] naming both Services and their files, and no frontend for it (its
//! other frontends are served). Explicit requests are settled before dynamic allocation, so a
//! new Service never takes an address another one asked for by value.
//!
//! # A clusterIP outside every `--service-cidr`
//!
//! kube-apiserver refuses it, because every ClusterIP of its cluster comes from its range.
//! Standalone mode accepts it as given: manifests are often exported from a real cluster
//! (`kubectl get svc -o yaml`) whose range is not svc-lb's default (k3s' 10.43.0.0/16, EKS's
//! 172.20.0.0/16, …), svc-lb always programmed such addresses before it allocated any, and
//! nothing in the dataplane depends on the range. `--service-cidr` only says where svc-lb
//! hands out addresses itself. Such an address is still exclusive to its first owner.

mod cluster_ip;
mod defaults;
mod node_port;
mod record;
mod standalone;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    ops::RangeInclusive,
};

use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};

pub use self::{
    cluster_ip::{CidrError, DEFAULT_SERVICE_CIDR, Family, ServiceCidr},
    node_port::DEFAULT_NODE_PORTS,
    record::{
        DEFAULT_STATE_DIR, RECORD_FILE, Record, RecordEntry, RecordError, RecordStore,
        RecordedExternal, RecordedNodePort,
    },
    standalone::{StandaloneAllocator, Update},
};
use self::{
    cluster_ip::{Claim, IpPool},
    defaults::{Normalized, ServiceType},
    node_port::{PortClaim, PortPool},
};
use super::manifest::Location;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn of(svc: &Service) -> Self {
        ServiceKey::new(
            super::namespace(&svc.metadata),
            svc.metadata.name.as_deref().unwrap_or_default(),
        )
    }

    /// The Service the API server creates itself; the only one allowed the first address of
    /// a range.
    fn is_kubernetes(&self) -> bool {
        self.namespace == "default" && self.name == "kubernetes"
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service and where it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub key: ServiceKey,
    pub origin: Option<Location>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Service {}", self.key)?;
        if let Some(at) = &self.origin {
            write!(f, " ({})", Origin(at))?;
        }
        Ok(())
    }
}

/// A location as messages show it: the file, and the document and line when known.
struct Origin<'a>(&'a Location);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.0;
        write!(f, "{}", at.file.display())?;
        if at.document > 0 {
            write!(f, ": document {} (line {})", at.document, at.line)?;
        }
        if let Some(i) = at.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// What standalone mode allocates from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocConfig {
    /// `--service-cidr`, in flag order: the first range's family is the primary one.
    pub service_cidrs: Vec<ServiceCidr>,
    /// `--nodeport-range`.
    pub node_ports: RangeInclusive<u16>,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            service_cidrs: vec![ServiceCidr::default()],
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

/// Why (part of) a Service is not served as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// A value the API server would refuse.
    #[error("{field}: {reason}; {effect}")]
    Invalid {
        field: String,
        reason: String,
        effect: String,
    },
    /// Another Service had it first.
    #[error("{field}: {value} is already used by {owner}; {effect}")]
    Conflict {
        field: String,
        value: String,
        owner: Box<ObjectRef>,
        effect: String,
    },
    /// The range is full.
    #[error("{field}: no free {what} left in {pool}; {effect}")]
    Exhausted {
        field: String,
        what: &'static str,
        pool: String,
        effect: String,
    },
    /// A recorded value no longer fits the configuration and was replaced.
    #[error("{field}: {old} {reason}; now {new}")]
    Moved {
        field: String,
        old: String,
        new: String,
        reason: String,
    },
}

/// One problem with one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: ObjectRef,
    pub error: AllocError,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.object.origin {
            write!(f, "{}: ", Origin(at))?;
        }
        write!(f, "Service {}: {}", self.object.key, self.error)
    }
}

/// An externalIP frontend a Service asked for but another Service had first: translation
/// must leave it out (the Service's other frontends are served).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeniedFrontend {
    pub service: ServiceKey,
    pub ip: IpAddr,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A Service to allocate for, and where it was read from (for messages).
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub service: &'a Service,
    pub origin: Option<&'a Location>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    /// The Services as the API server would store them, in input order: defaults applied,
    /// allocated clusterIP(s), nodePorts and healthCheckNodePort written in, values that were
    /// refused removed. Services refused as a whole are left out.
    pub services: Vec<Service>,
    /// Sorted by Service, then in the order found.
    pub problems: Vec<Problem>,
    pub denied: BTreeSet<DeniedFrontend>,
    /// The record to save for the next run.
    pub record: Record,
}

impl Allocation {
    /// Fills in where the Services named in problems (with a conflict, both of them) were read
    /// from, for those without an origin yet: `locate` is asked once per such Service, so a
    /// caller that does not keep locations (the manifest cache) finds only these.
    pub fn locate(&mut self, locate: &mut impl FnMut(&ServiceKey) -> Option<Location>) {
        let mut found: HashMap<ServiceKey, Option<Location>> = HashMap::new();
        let mut fill = |r: &mut ObjectRef| {
            if r.origin.is_none() {
                r.origin = found
                    .entry(r.key.clone())
                    .or_insert_with(|| locate(&r.key))
                    .clone();
            }
        };
        for p in &mut self.problems {
            fill(&mut p.object);
            if let AllocError::Conflict { owner, .. } = &mut p.error {
                fill(owner);
            }
        }
    }
}

/// Everything about one Service while allocating.
struct Work<'r> {
    object: ObjectRef,
    /// Input position (output order).
    index: usize,
    created: Option<Timestamp>,
    seen: u64,
    recorded: Option<&'r RecordEntry>,
    /// None: refused as a whole (but its recorded values stay reserved).
    norm: Option<Normalized>,
    problems: Vec<AllocError>,
    /// Families it needs a ClusterIP of, primary first.
    families: Vec<Family>,
    ips: BTreeMap<Family, IpAddr>,
    /// Families whose explicit address was refused: no dynamic one instead.
    ip_refused: BTreeSet<Family>,
    /// Per kept spec port.
    node_ports: Vec<Option<u16>>,
    np_refused: Vec<bool>,
    /// Spec ports whose given nodePort is outside `--nodeport-range`: the value stays in the
    /// Service so translation rejects that frontend with its own reason (also counted in
    /// `svc_lb_rejected_objects`), instead of reading as "no nodePort".
    np_out_of_range: Vec<bool>,
    hcnp: Option<u16>,
    hc_refused: bool,
    /// (ip, port, protocol) → granted.
    externals: Vec<((IpAddr, u16, String), bool)>,
}

impl Work<'_> {
    fn spec_ports(&self) -> &[k8s_openapi::api::core::v1::ServicePort] {
        self.norm
            .as_ref()
            .and_then(|n| n.svc.spec.as_ref())
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
    }

    fn type_(&self) -> Option<ServiceType> {
        self.norm.as_ref().map(|n| n.type_)
    }

    /// NodePort or LoadBalancer: node ports given by value are honoured.
    fn has_node_ports(&self) -> bool {
        matches!(
            self.type_(),
            Some(ServiceType::NodePort | ServiceType::LoadBalancer)
        )
    }

    /// Node ports are allocated for ports without one (LoadBalancers may opt out).
    fn allocates_node_ports(&self) -> bool {
        match self.type_() {
            Some(ServiceType::NodePort) => true,
            Some(ServiceType::LoadBalancer) => self
                .norm
                .as_ref()
                .and_then(|n| n.svc.spec.as_ref())
                .and_then(|s| s.allocate_load_balancer_node_ports)
                .unwrap_or(true),
            _ => false,
        }
    }

    fn needs_health_check(&self) -> bool {
        self.type_() == Some(ServiceType::LoadBalancer)
            && self
                .norm
                .as_ref()
                .and_then(|n| n.svc.spec.as_ref())
                .and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local")
    }

    fn explicit_health_check(&self) -> Option<u16> {
        self.norm
            .as_ref()
            .and_then(|n| n.svc.spec.as_ref())
            .and_then(|s| s.health_check_node_port)
            .and_then(|p| u16::try_from(p).ok())
    }

    fn port_label(&self, i: usize) -> String {
        let p = &self.spec_ports()[i];
        match p.name.as_deref() {
            Some(n) if !n.is_empty() => format!("port {n:?}"),
            _ => format!("port {}", p.port),
        }
    }

    /// The node port another port of this Service with the same `port` number holds.
    fn shared_node_port(&self, i: usize) -> Option<u16> {
        let port = self.spec_ports()[i].port;
        self.spec_ports()
            .iter()
            .zip(&self.node_ports)
            .enumerate()
            .find(|(j, (p, np))| *j != i && p.port == port && np.is_some())
            .and_then(|(_, (_, np))| *np)
    }

    /// Another port of this Service (with a different `port` number) holding `np`.
    fn node_port_used_elsewhere(&self, i: usize, np: u16) -> Option<usize> {
        let port = self.spec_ports()[i].port;
        self.spec_ports()
            .iter()
            .zip(&self.node_ports)
            .enumerate()
            .find(|(j, (p, held))| *j != i && p.port != port && **held == Some(np))
            .map(|(j, _)| j)
    }
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finalizer so that nearby names spread over
/// the whole range): the same on every node, build and Rust version.
fn seed(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Allocates for every Service of one manifest read. Pure: `record` is the last saved record
/// (empty on the first run), the result's `record` the one to save.
pub fn allocate<'a>(
    inputs: impl IntoIterator<Item = Input<'a>>,
    record: &Record,
    cfg: &AllocConfig,
) -> Allocation {
    let mut works: Vec<Work<'_>> = Vec::new();
    let mut keys = BTreeSet::new();
    for (index, input) in inputs.into_iter().enumerate() {
        let key = ServiceKey::of(input.service);
        // The loaders never produce two Services with one name (they report duplicates).
        if !keys.insert(key.clone()) {
            continue;
        }
        let recorded = record.services.get(&key.to_string());
        let (norm, problems) = match defaults::normalize(input.service) {
            Ok(mut n) => {
                let problems = std::mem::take(&mut n.problems);
                (Some(n), problems)
            }
            Err(e) => (None, vec![e]),
        };
        let ports = norm
            .as_ref()
            .and_then(|n| n.svc.spec.as_ref())
            .and_then(|s| s.ports.as_ref())
            .map_or(0, Vec::len);
        let np_refused = (0..ports)
            .map(|i| {
                norm.as_ref()
                    .is_some_and(|n| n.node_port_refused.contains(&i))
            })
            .collect();
        let hc_refused = norm.as_ref().is_some_and(|n| n.health_check_refused);
        works.push(Work {
            object: ObjectRef {
                key,
                origin: input.origin.cloned(),
            },
            index,
            created: input
                .service
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0),
            seen: recorded.map_or(u64::MAX, |r| r.seen),
            recorded,
            norm,
            problems,
            families: Vec::new(),
            ips: BTreeMap::new(),
            ip_refused: BTreeSet::new(),
            node_ports: vec![None; ports],
            np_refused,
            np_out_of_range: vec![false; ports],
            hcnp: None,
            hc_refused,
            externals: Vec::new(),
        });
    }

    // Newcomers are "seen" after every recorded Service, in creationTimestamp then name order.
    let first_new = record
        .services
        .values()
        .map(|e| e.seen + 1)
        .max()
        .unwrap_or(0);
    let mut newcomers: Vec<usize> = (0..works.len())
        .filter(|&i| works[i].recorded.is_none())
        .collect();
    newcomers.sort_by(|&a, &b| {
        let (a, b) = (&works[a], &works[b]);
        (a.created.is_none(), a.created, &a.object.key).cmp(&(
            b.created.is_none(),
            b.created,
            &b.object.key,
        ))
    });
    for (seen, i) in (first_new..).zip(newcomers) {
        works[i].seen = seen;
    }
    // Who wins a value nobody holds yet: earlier creationTimestamp (Services without one
    // count as created when first seen, after those with one), then first seen.
    works.sort_by(|a, b| {
        (a.created.is_none(), a.created, a.seen, &a.object.key).cmp(&(
            b.created.is_none(),
            b.created,
            b.seen,
            &b.object.key,
        ))
    });

    let mut ips = IpPool::new(&cfg.service_cidrs);
    let mut ports = PortPool::new(cfg.node_ports.clone());
    let mut externals: BTreeMap<(IpAddr, u16, String), ServiceKey> = BTreeMap::new();

    for w in &mut works {
        plan_families(w, &ips);
        plan_externals(w);
    }
    for w in &mut works {
        keep_recorded(w, &mut ips, &mut ports, &mut externals);
    }
    let owners: BTreeMap<ServiceKey, ObjectRef> = works
        .iter()
        .map(|w| (w.object.key.clone(), w.object.clone()))
        .collect();
    let owner_ref = |key: &ServiceKey| {
        Box::new(owners.get(key).cloned().unwrap_or_else(|| ObjectRef {
            key: key.clone(),
            origin: None,
        }))
    };
    for w in &mut works {
        claim_explicit(w, &mut ips, &mut ports, &mut externals, &owner_ref);
    }
    for w in &mut works {
        allocate_dynamic(w, &mut ips, &mut ports);
    }

    // Output: input order.
    works.sort_by_key(|w| w.index);
    let mut out = Allocation {
        record: Record::new(),
        ..Default::default()
    };
    for mut w in works {
        let key = w.object.key.to_string();
        out.problems.extend(w.problems.iter().map(|e| Problem {
            object: w.object.clone(),
            error: e.clone(),
        }));
        for ((ip, port, protocol), granted) in &w.externals {
            if !granted {
                out.denied.insert(DeniedFrontend {
                    service: w.object.key.clone(),
                    ip: *ip,
                    port: *port,
                    protocol: protocol.clone(),
                });
            }
        }
        let Some(norm) = w.norm.as_mut() else {
            // Refused for now: it keeps what it held until it is fixed or deleted.
            if let Some(entry) = w.recorded {
                out.record.services.insert(key, entry.clone());
            }
            continue;
        };
        let mut svc = std::mem::take(&mut norm.svc);
        let entry = entry_of(&w, &svc);
        out.record.services.insert(key, entry);
        write_back(&mut svc, &w);
        out.services.push(svc);
    }
    out.problems.sort_by(|a, b| a.object.key.cmp(&b.object.key));
    out
}

/// The ClusterIP families `w` needs; a refusal skips the Service.
fn plan_families(w: &mut Work<'_>, pool: &IpPool) {
    let Some(norm) = &w.norm else { return };
    if norm.headless || norm.type_ == ServiceType::ExternalName {
        return;
    }
    match families(norm, &pool.families()) {
        Ok(f) => w.families = f,
        Err((field, reason)) => {
            w.problems.push(AllocError::Invalid {
                field: field.into(),
                reason,
                effect: "Service skipped".into(),
            });
            w.norm = None;
        }
    }
}

/// kube-apiserver's IP family rules (`ipFamilyPolicy`, `ipFamilies`, `clusterIPs`), with
/// `configured` the families that have a `--service-cidr`, primary first.
fn families(
    norm: &Normalized,
    configured: &[Family],
) -> Result<Vec<Family>, (&'static str, String)> {
    let spec = norm.svc.spec.as_ref();
    let policy = spec
        .and_then(|s| s.ip_family_policy.as_deref())
        .unwrap_or("SingleStack");
    let dual = match policy {
        "SingleStack" => false,
        "PreferDualStack" | "RequireDualStack" => true,
        other => {
            return Err((
                "spec.ipFamilyPolicy",
                format!(
                    "unsupported value {other:?} (SingleStack, PreferDualStack or \
                     RequireDualStack)"
                ),
            ));
        }
    };
    let mut requested = Vec::new();
    for f in spec
        .and_then(|s| s.ip_families.as_ref())
        .into_iter()
        .flatten()
    {
        let family = Family::from_api_name(f).ok_or((
            "spec.ipFamilies",
            format!("unsupported value {f:?} (IPv4 or IPv6)"),
        ))?;
        if requested.contains(&family) {
            return Err(("spec.ipFamilies", format!("{f} is listed twice")));
        }
        requested.push(family);
    }
    let from_ips: Vec<Family> = norm.explicit_ips.iter().map(|ip| Family::of(*ip)).collect();
    for (i, (a, b)) in from_ips.iter().zip(&requested).enumerate() {
        if a != b {
            return Err((
                "spec.ipFamilies",
                format!(
                    "ipFamilies[{i}] is {b} but clusterIPs[{i}] ({}) is {a}",
                    norm.explicit_ips[i]
                ),
            ));
        }
    }
    let mut wanted = if !requested.is_empty() && requested.len() >= from_ips.len() {
        requested.clone()
    } else if !from_ips.is_empty() {
        from_ips.clone()
    } else {
        configured.iter().take(1).copied().collect()
    };
    if !dual && wanted.len() > 1 {
        return Err((
            "spec.ipFamilyPolicy",
            "SingleStack allows one IP family; use PreferDualStack or RequireDualStack for \
             two"
            .into(),
        ));
    }
    if dual
        && wanted.len() == 1
        && let Some(other) = configured.iter().find(|f| **f != wanted[0])
    {
        wanted.push(*other);
    }
    if policy == "RequireDualStack" && (wanted.len() < 2 || configured.len() < 2) {
        return Err((
            "spec.ipFamilyPolicy",
            "RequireDualStack needs an IPv4 and an IPv6 --service-cidr".into(),
        ));
    }
    // A family without a range can only be served with an address given by value.
    let mut out = Vec::new();
    for (i, f) in wanted.into_iter().enumerate() {
        if configured.contains(&f) || from_ips.contains(&f) {
            out.push(f);
        } else if i == 0 || policy == "RequireDualStack" {
            return Err((
                "spec.ipFamilies",
                format!("{f} requested but there is no {f} --service-cidr"),
            ));
        }
        // PreferDualStack: the second family is optional.
    }
    Ok(out)
}

/// The externalIP frontends `w` asks for.
fn plan_externals(w: &mut Work<'_>) {
    let Some(spec) = w.norm.as_ref().and_then(|n| n.svc.spec.as_ref()) else {
        return;
    };
    let ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect();
    for p in spec.ports.iter().flatten() {
        for ip in &ips {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            w.externals.push(((*ip, p.port as u16, proto), false));
        }
    }
}

/// Phase 1: every Service keeps what the record says it holds, if it still asks for it (or
/// leaves it unset).
fn keep_recorded(
    w: &mut Work<'_>,
    ips: &mut IpPool,
    ports: &mut PortPool,
    externals: &mut BTreeMap<(IpAddr, u16, String), ServiceKey>,
) {
    let Some(rec) = w.recorded else { return };
    let key = w.object.key.clone();
    if w.norm.is_none() {
        // Refused for now: reserve everything it held (it will want it back once fixed).
        for ip in &rec.cluster_ips {
            let _ = ips.keep(*ip, &key);
        }
        for np in rec.node_ports.iter().map(|n| n.node_port) {
            let _ = ports.claim(np, &key);
        }
        if let Some(hc) = rec.health_check_node_port {
            let _ = ports.claim(hc, &key);
        }
        for e in &rec.external {
            externals
                .entry((e.ip, e.port, e.protocol.clone()))
                .or_insert(key.clone());
        }
        return;
    }
    let explicit: BTreeMap<Family, IpAddr> = w
        .norm
        .as_ref()
        .map(|n| {
            n.explicit_ips
                .iter()
                .map(|ip| (Family::of(*ip), *ip))
                .collect()
        })
        .unwrap_or_default();
    for ip in &rec.cluster_ips {
        let f = Family::of(*ip);
        let unchanged = explicit.get(&f).is_none_or(|e| e == ip);
        if w.families.contains(&f) && unchanged && ips.keep(*ip, &key).is_ok() {
            w.ips.insert(f, *ip);
        }
    }
    if w.has_node_ports() {
        // Node ports given by value in the spec, which an omitted one may not take.
        let given: BTreeSet<u16> = w
            .spec_ports()
            .iter()
            .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
            .collect();
        for i in 0..w.node_ports.len() {
            if w.np_refused[i] {
                continue;
            }
            let p = &w.spec_ports()[i];
            let name = p.name.clone().unwrap_or_default();
            let Some(r) = rec.node_ports.iter().find(|r| r.name == name) else {
                continue;
            };
            let np = r.node_port;
            let explicit = p.node_port.and_then(|n| u16::try_from(n).ok());
            let keep = match explicit {
                Some(e) => e == np,
                // Patched back in like kube-apiserver does on update, unless a port given
                // by value uses it now; only where a node port would be allocated.
                None => !given.contains(&np) && w.allocates_node_ports(),
            };
            if !keep {
                continue;
            }
            match ports.claim(np, &key) {
                PortClaim::Granted => w.node_ports[i] = Some(np),
                PortClaim::OutOfRange => {
                    // --nodeport-range changed: allocated again below (the datapath only
                    // serves node ports inside the range).
                }
                PortClaim::Taken(_) => {}
            }
        }
    }
    if w.needs_health_check()
        && !w.hc_refused
        && let Some(hc) = rec.health_check_node_port
        && w.explicit_health_check().is_none_or(|e| e == hc)
        && !w.node_ports.contains(&Some(hc))
        && ports.claim(hc, &key) == PortClaim::Granted
    {
        w.hcnp = Some(hc);
    }
    for (claim, granted) in &mut w.externals {
        let recorded = rec
            .external
            .iter()
            .any(|e| (e.ip, e.port, &e.protocol) == (claim.0, claim.1, &claim.2));
        if recorded && !externals.contains_key(claim) {
            externals.insert(claim.clone(), key.clone());
            *granted = true;
        }
    }
}

/// Phase 2: values given in the spec, first owner first.
fn claim_explicit(
    w: &mut Work<'_>,
    ips: &mut IpPool,
    ports: &mut PortPool,
    externals: &mut BTreeMap<(IpAddr, u16, String), ServiceKey>,
    owner_ref: &impl Fn(&ServiceKey) -> Box<ObjectRef>,
) {
    let Some(norm) = &w.norm else { return };
    let key = w.object.key.clone();
    let explicit = norm.explicit_ips.clone();
    for (i, ip) in explicit.into_iter().enumerate() {
        let f = Family::of(ip);
        if w.ips.get(&f) == Some(&ip) || !w.families.contains(&f) {
            continue;
        }
        let field = format!("spec.clusterIPs[{i}]");
        // A refused change keeps the address the Service had (kube-apiserver refuses the
        // update and keeps the old object).
        let recorded = w
            .recorded
            .and_then(|r| r.cluster_ips.iter().copied().find(|r| Family::of(*r) == f));
        let mut fallback = |ips: &mut IpPool| -> String {
            match recorded {
                Some(old) if old != ip && ips.keep(old, &key).is_ok() => {
                    w.ips.insert(f, old);
                    format!("it keeps {old}")
                }
                _ => {
                    w.ip_refused.insert(f);
                    format!("no {f} ClusterIP frontends")
                }
            }
        };
        match ips.claim(ip, &key, key.is_kubernetes()) {
            Claim::Granted => {
                w.ips.insert(f, ip);
            }
            Claim::Taken(owner) => {
                let effect = fallback(ips);
                w.problems.push(AllocError::Conflict {
                    field,
                    value: ip.to_string(),
                    owner: owner_ref(&owner),
                    effect,
                });
            }
            Claim::Reserved(range, why) => {
                let effect = fallback(ips);
                w.problems.push(AllocError::Invalid {
                    field,
                    reason: format!(
                        "{ip} is {why} of --service-cidr {range} and is never handed out"
                    ),
                    effect,
                });
            }
        }
    }
    if w.has_node_ports() {
        for i in 0..w.node_ports.len() {
            let Some(np) = w.spec_ports()[i]
                .node_port
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            if w.node_ports[i] == Some(np) || w.np_refused[i] {
                continue;
            }
            let field = format!("spec.ports[{i}].nodePort");
            let label = w.port_label(i);
            if let Some(j) = w.node_port_used_elsewhere(i, np) {
                let other = w.port_label(j);
                w.problems.push(AllocError::Invalid {
                    field,
                    reason: format!(
                        "{np} is already the node port of {other} of this Service (ports \
                         share a node port only when they have the same port number)"
                    ),
                    effect: format!("no NodePort frontend for {label}"),
                });
                w.np_refused[i] = true;
                continue;
            }
            match ports.claim(np, &key) {
                PortClaim::Granted => w.node_ports[i] = Some(np),
                PortClaim::Taken(owner) => {
                    let effect = node_port_fallback(w, i, np, ports, &label);
                    w.problems.push(AllocError::Conflict {
                        field,
                        value: format!("nodePort {np}"),
                        owner: owner_ref(&owner),
                        effect,
                    });
                }
                PortClaim::OutOfRange => {
                    let r = ports.range();
                    w.problems.push(AllocError::Invalid {
                        field,
                        reason: format!(
                            "{np} is outside the node port range {}-{} (--nodeport-range)",
                            r.start(),
                            r.end()
                        ),
                        effect: format!("no NodePort frontend for {label}"),
                    });
                    w.np_refused[i] = true;
                    w.np_out_of_range[i] = true;
                }
            }
        }
    }
    if w.needs_health_check()
        && !w.hc_refused
        && let Some(hc) = w.explicit_health_check()
        && w.hcnp != Some(hc)
    {
        let field = "spec.healthCheckNodePort".to_string();
        if w.node_ports.contains(&Some(hc)) {
            w.problems.push(AllocError::Invalid {
                field,
                reason: format!("{hc} is already a node port of this Service"),
                effect: "no health check node port".into(),
            });
            w.hc_refused = true;
        } else {
            match ports.claim(hc, &key) {
                PortClaim::Granted => w.hcnp = Some(hc),
                PortClaim::Taken(owner) => {
                    w.problems.push(AllocError::Conflict {
                        field,
                        value: format!("node port {hc}"),
                        owner: owner_ref(&owner),
                        effect: "no health check node port".into(),
                    });
                    w.hc_refused = true;
                }
                PortClaim::OutOfRange => {
                    let r = ports.range();
                    w.problems.push(AllocError::Invalid {
                        field,
                        reason: format!(
                            "{hc} is outside the node port range {}-{} (--nodeport-range)",
                            r.start(),
                            r.end()
                        ),
                        effect: "no health check node port".into(),
                    });
                    w.hc_refused = true;
                }
            }
        }
    }
    for (claim, granted) in &mut w.externals {
        if *granted {
            continue;
        }
        match externals.get(claim) {
            Some(owner) if *owner != key => {
                let (ip, port, proto) = claim;
                w.problems.push(AllocError::Conflict {
                    field: "spec.externalIPs".into(),
                    value: format!("{}:{port}/{proto}", fmt_ip(*ip)),
                    owner: owner_ref(owner),
                    effect: "no externalIP frontend for it".into(),
                });
            }
            _ => {
                externals.insert(claim.clone(), key.clone());
                *granted = true;
            }
        }
    }
}

/// `ip` as in an address:port pair (IPv6 in brackets).
fn fmt_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// After port `i` of `w` was refused node port `np`: it keeps the one it had, if any.
fn node_port_fallback(
    w: &mut Work<'_>,
    i: usize,
    np: u16,
    ports: &mut PortPool,
    label: &str,
) -> String {
    let name = w.spec_ports()[i].name.clone().unwrap_or_default();
    let old = w
        .recorded
        .and_then(|r| r.node_ports.iter().find(|r| r.name == name))
        .map(|r| r.node_port)
        .filter(|old| *old != np && w.node_port_used_elsewhere(i, *old).is_none());
    if let Some(old) = old
        && ports.claim(old, &w.object.key) == PortClaim::Granted
    {
        w.node_ports[i] = Some(old);
        return format!("{label} keeps node port {old}");
    }
    w.np_refused[i] = true;
    format!("no NodePort frontend for {label}")
}

/// Phase 3: values neither recorded nor given, from the hash of the Service's name.
fn allocate_dynamic(w: &mut Work<'_>, ips: &mut IpPool, ports: &mut PortPool) {
    if w.norm.is_none() {
        return;
    }
    let key = w.object.key.clone();
    for f in w.families.clone() {
        if w.ips.contains_key(&f) || w.ip_refused.contains(&f) {
            continue;
        }
        // kube-apiserver gives its own Service the first address of the range.
        let kubernetes = key
            .is_kubernetes()
            .then(|| {
                let range = ips.ranges().iter().find(|r| r.family() == f)?;
                let ip = range.kubernetes_address()?;
                (ips.claim(ip, &key, true) == Claim::Granted).then_some(ip)
            })
            .flatten();
        let allocated = kubernetes.or_else(|| ips.allocate(f, seed(&format!("{key}/{f}")), &key));
        match allocated {
            Some(ip) => {
                w.ips.insert(f, ip);
            }
            None => {
                let ranges: Vec<String> = ips
                    .ranges()
                    .iter()
                    .filter(|r| r.family() == f)
                    .map(ToString::to_string)
                    .collect();
                w.problems.push(AllocError::Exhausted {
                    field: "spec.clusterIP".into(),
                    what: "address",
                    pool: format!("--service-cidr {}", ranges.join(", ")),
                    effect: format!("no {f} ClusterIP frontends"),
                });
                w.ip_refused.insert(f);
            }
        }
    }
    if w.allocates_node_ports() {
        for i in 0..w.node_ports.len() {
            if w.node_ports[i].is_some() || w.np_refused[i] {
                continue;
            }
            if let Some(np) = w.shared_node_port(i) {
                w.node_ports[i] = Some(np);
                continue;
            }
            let port = w.spec_ports()[i].port;
            let label = w.port_label(i);
            match ports.allocate(seed(&format!("{key}:{port}")), &key) {
                Some(np) => {
                    let name = w.spec_ports()[i].name.clone().unwrap_or_default();
                    if let Some(old) = w
                        .recorded
                        .and_then(|r| r.node_ports.iter().find(|r| r.name == name))
                        .map(|r| r.node_port)
                        .filter(|old| !ports.range().contains(old))
                    {
                        let r = ports.range();
                        w.problems.push(AllocError::Moved {
                            field: format!("spec.ports[{i}].nodePort"),
                            old: old.to_string(),
                            new: np.to_string(),
                            reason: format!(
                                "is outside the node port range {}-{} (--nodeport-range)",
                                r.start(),
                                r.end()
                            ),
                        });
                    }
                    w.node_ports[i] = Some(np);
                }
                None => {
                    let r = ports.range();
                    w.problems.push(AllocError::Exhausted {
                        field: format!("spec.ports[{i}].nodePort"),
                        what: "node port",
                        pool: format!("--nodeport-range {}-{}", r.start(), r.end()),
                        effect: format!("no NodePort frontend for {label}"),
                    });
                    w.np_refused[i] = true;
                }
            }
        }
    }
    if w.needs_health_check() && w.hcnp.is_none() && !w.hc_refused {
        match ports.allocate(seed(&format!("{key}:healthCheckNodePort")), &key) {
            Some(hc) => w.hcnp = Some(hc),
            None => {
                let r = ports.range();
                w.problems.push(AllocError::Exhausted {
                    field: "spec.healthCheckNodePort".into(),
                    what: "node port",
                    pool: format!("--nodeport-range {}-{}", r.start(), r.end()),
                    effect: "no health check node port".into(),
                });
            }
        }
    }
}

/// What `w` holds now, for the record.
fn entry_of(w: &Work<'_>, svc: &Service) -> RecordEntry {
    let node_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .zip(&w.node_ports)
        .filter_map(|(p, np)| {
            Some(RecordedNodePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port as u16,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                node_port: (*np)?,
            })
        })
        .collect();
    RecordEntry {
        seen: w.seen,
        cluster_ips: w
            .families
            .iter()
            .filter_map(|f| w.ips.get(f))
            .copied()
            .collect(),
        node_ports,
        health_check_node_port: w.hcnp,
        external: w
            .externals
            .iter()
            .filter(|(_, granted)| *granted)
            .map(|((ip, port, protocol), _)| RecordedExternal {
                ip: *ip,
                port: *port,
                protocol: protocol.clone(),
            })
            .collect(),
    }
}

/// Writes what `w` holds into its Service, as the API server stores it.
fn write_back(svc: &mut Service, w: &Work<'_>) {
    let Some(spec) = svc.spec.as_mut() else {
        return;
    };
    let Some(norm) = &w.norm else { return };
    if norm.type_ == ServiceType::ExternalName {
        return;
    }
    if norm.headless {
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
    } else {
        let held: Vec<String> = w
            .families
            .iter()
            .filter_map(|f| w.ips.get(f))
            .map(ToString::to_string)
            .collect();
        spec.cluster_ip = Some(held.first().cloned().unwrap_or_default());
        spec.cluster_ips = (!held.is_empty()).then_some(held);
        spec.ip_families = Some(w.families.iter().map(|f| f.api_name().to_owned()).collect());
        if spec.ip_family_policy.is_none() {
            spec.ip_family_policy = Some("SingleStack".into());
        }
    }
    if let Some(ports) = spec.ports.as_mut() {
        for ((p, np), out_of_range) in ports.iter_mut().zip(&w.node_ports).zip(&w.np_out_of_range) {
            if !out_of_range {
                p.node_port = np.map(i32::from);
            }
        }
    }
    spec.health_check_node_port = w.hcnp.map(i32::from);
}

/// Loads the record for [`allocate`]: an unreadable one is moved aside (and reported) so
/// that allocation starts afresh instead of failing forever; the deterministic hash gives
/// most Services the same values again.
pub fn load_record(store: &RecordStore) -> (Record, Option<RecordError>) {
    match store.load() {
        Ok(r) => (r, None),
        Err(e @ RecordError::Invalid { .. }) => {
            let _ = store.set_aside();
            (Record::new(), Some(e))
        }
        Err(e) => (Record::new(), Some(e)),
    }
}

#[cfg(test)]
mod tests;
