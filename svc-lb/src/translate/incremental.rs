//! Translation that follows changes: the agent hands over the current objects after every
//! event burst, and only Services whose own objects changed are translated again (a Service,
//! its EndpointSlices, or Pods in its namespace for Services without slices); a change to this
//! node's addresses re-translates everything. The result is always what [`super::translate`]
//! gives for the same objects (a property test checks this), plus the frontend keys whose
//! desired value changed, which is what the reconciler programs.
//!
//! Objects are shared (`Arc`) with whoever holds them (the reflector stores in API mode, the
//! manifest cache in manifest mode), so keeping them costs no copy, and an unchanged object is
//! recognised by pointer before it is compared by value.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use tracing::debug;

use super::{
    Rejected, ServiceFrontends, ServiceId, TranslateConfig, conflict, describe_service,
    service::node_addresses, service_id, slice_owner, translate_service,
};
use crate::{
    k8s::{manifest::Objects, namespace},
    model::{DesiredState, FrontendKey},
};

/// The objects translation reads, shared rather than copied.
#[derive(Clone, Debug, Default)]
pub struct SharedObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
}

impl SharedObjects {
    /// A plain copy (for consumers that want owned objects, such as the DNS view).
    pub fn to_objects(&self) -> Objects {
        Objects {
            services: self.services.iter().map(|o| Service::clone(o)).collect(),
            endpoint_slices: self
                .endpoint_slices
                .iter()
                .map(|o| EndpointSlice::clone(o))
                .collect(),
            pods: self.pods.iter().map(|o| Pod::clone(o)).collect(),
            nodes: self.nodes.iter().map(|o| Node::clone(o)).collect(),
        }
    }
}

impl From<Objects> for SharedObjects {
    fn from(o: Objects) -> Self {
        Self {
            services: o.services.into_iter().map(Arc::new).collect(),
            endpoint_slices: o.endpoint_slices.into_iter().map(Arc::new).collect(),
            pods: o.pods.into_iter().map(Arc::new).collect(),
            nodes: o.nodes.into_iter().map(Arc::new).collect(),
        }
    }
}

/// The same object: the same allocation, or equal content (a re-read file or a re-list gives
/// new allocations for unchanged objects).
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// What an object of the last snapshot fed.
#[derive(Clone, Debug)]
enum Feeds {
    Service(ServiceId),
    Slice(ServiceId),
    /// Pods feed the Services of their namespace.
    Pod(String),
    /// Slices without the service-name label feed nothing.
    Nothing,
}

/// The address of a shared object: what identifies it between snapshots.
fn addr<T>(o: &Arc<T>) -> usize {
    Arc::as_ptr(o) as usize
}

/// Objects grouped the way one Service's translation reads them, kept up to date from
/// snapshot to snapshot by object address, so that an update costs a pass over addresses plus
/// the work for what changed (no per-object keys are built for unchanged objects).
#[derive(Debug, Default)]
struct Inputs {
    /// The first of two objects with one name wins, as in `translate` (the loaders never
    /// produce two).
    services: HashMap<ServiceId, Vec<Arc<Service>>>,
    /// By owning Service.
    slices: HashMap<ServiceId, Vec<Arc<EndpointSlice>>>,
    /// By namespace.
    pods: HashMap<String, Vec<Arc<Pod>>>,
    /// Every object of the last snapshot, by address.
    feeds: HashMap<usize, Feeds>,
}

/// What an update of [`Inputs`] touched.
#[derive(Debug, Default)]
struct Touched {
    services: BTreeSet<ServiceId>,
    namespaces: BTreeSet<String>,
}

/// Removes the object at `address` from `list`, returning it.
fn take<T>(list: &mut Vec<Arc<T>>, address: usize) -> Option<Arc<T>> {
    let i = list.iter().position(|o| addr(o) == address)?;
    Some(list.remove(i))
}

/// Whether `a` and `b` hold equal objects (in any order).
fn same_set<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && b.iter().all(|x| a.iter().any(|y| same(x, y)))
}

impl Inputs {
    fn service(&self, id: &ServiceId) -> Option<&Arc<Service>> {
        self.services.get(id)?.first()
    }

    /// Takes the next snapshot. An object at an address seen before is unchanged; the others
    /// are compared by value with what they replace (a re-read file or a re-list allocates
    /// unchanged objects anew) and only real changes are reported.
    fn update(&mut self, objects: &SharedObjects) -> Touched {
        let now: HashSet<usize> = objects
            .services
            .iter()
            .map(addr)
            .chain(objects.endpoint_slices.iter().map(addr))
            .chain(objects.pods.iter().map(addr))
            .collect();
        // What left, by what it fed (kept to compare with what arrives).
        let mut gone_services: HashMap<ServiceId, Vec<Arc<Service>>> = HashMap::new();
        let mut gone_slices: HashMap<ServiceId, Vec<Arc<EndpointSlice>>> = HashMap::new();
        let mut touched = Touched::default();
        let left: Vec<(usize, Feeds)> = self
            .feeds
            .iter()
            .filter(|(a, _)| !now.contains(a))
            .map(|(a, f)| (*a, f.clone()))
            .collect();
        for (address, feeds) in left {
            self.feeds.remove(&address);
            match feeds {
                Feeds::Service(id) => {
                    if let Some(o) = self.services.get_mut(&id).and_then(|l| take(l, address)) {
                        gone_services.entry(id).or_default().push(o);
                    }
                }
                Feeds::Slice(id) => {
                    if let Some(o) = self.slices.get_mut(&id).and_then(|l| take(l, address)) {
                        gone_slices.entry(id).or_default().push(o);
                    }
                }
                Feeds::Pod(ns) => {
                    if let Some(l) = self.pods.get_mut(&ns) {
                        take(l, address);
                    }
                    touched.namespaces.insert(ns);
                }
                Feeds::Nothing => {}
            }
        }
        let mut new_services: HashMap<ServiceId, Vec<Arc<Service>>> = HashMap::new();
        let mut new_slices: HashMap<ServiceId, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for svc in &objects.services {
            if let std::collections::hash_map::Entry::Vacant(e) = self.feeds.entry(addr(svc)) {
                let id = service_id(svc);
                e.insert(Feeds::Service(id.clone()));
                self.services
                    .entry(id.clone())
                    .or_default()
                    .push(svc.clone());
                new_services.entry(id).or_default().push(svc.clone());
            }
        }
        for slice in &objects.endpoint_slices {
            if let std::collections::hash_map::Entry::Vacant(e) = self.feeds.entry(addr(slice)) {
                match slice_owner(slice) {
                    Some(id) => {
                        e.insert(Feeds::Slice(id.clone()));
                        self.slices
                            .entry(id.clone())
                            .or_default()
                            .push(slice.clone());
                        new_slices.entry(id).or_default().push(slice.clone());
                    }
                    None => {
                        e.insert(Feeds::Nothing);
                    }
                }
            }
        }
        for pod in &objects.pods {
            if let std::collections::hash_map::Entry::Vacant(e) = self.feeds.entry(addr(pod)) {
                let ns = namespace(&pod.metadata).to_owned();
                e.insert(Feeds::Pod(ns.clone()));
                self.pods.entry(ns.clone()).or_default().push(pod.clone());
                touched.namespaces.insert(ns);
            }
        }
        let empty_svc = Vec::new();
        for id in gone_services.keys().chain(new_services.keys()) {
            let (a, b) = (
                gone_services.get(id).unwrap_or(&empty_svc),
                new_services.get(id).unwrap_or(&empty_svc),
            );
            if !same_set(a, b) {
                touched.services.insert(id.clone());
            }
        }
        let empty_slices = Vec::new();
        for id in gone_slices.keys().chain(new_slices.keys()) {
            let (a, b) = (
                gone_slices.get(id).unwrap_or(&empty_slices),
                new_slices.get(id).unwrap_or(&empty_slices),
            );
            if !same_set(a, b) {
                touched.services.insert(id.clone());
            }
        }
        self.services.retain(|_, l| !l.is_empty());
        self.slices.retain(|_, l| !l.is_empty());
        self.pods.retain(|_, l| !l.is_empty());
        touched
    }
}

/// Keeps the translation of the last objects it was given, per Service, and the desired
/// state assembled from it.
#[derive(Debug)]
pub struct IncrementalTranslator {
    cfg: TranslateConfig,
    node_ips: Vec<Ipv4Addr>,
    inputs: Inputs,
    per_service: BTreeMap<ServiceId, ServiceFrontends>,
    /// Frontend key -> (Service, index in its `frontends`) that ask for it; the first owns it.
    /// A sorted `Vec`, not a `BTreeSet`: almost every key has one claimant, and a set
    /// allocates a whole tree node for it (10k Services: ~6 MB instead of <1 MB).
    claims: HashMap<FrontendKey, Vec<(ServiceId, usize)>>,
    state: DesiredState,
    rejected: Vec<Rejected>,
    /// Nothing translated yet: the first update translates everything.
    fresh: bool,
}

impl IncrementalTranslator {
    pub fn new(cfg: TranslateConfig) -> Self {
        Self {
            cfg,
            node_ips: Vec::new(),
            inputs: Inputs::default(),
            per_service: BTreeMap::new(),
            claims: HashMap::new(),
            state: DesiredState::default(),
            rejected: Vec::new(),
            fresh: true,
        }
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// In the order [`super::translate`] reports them.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Health checks of the current Services, like [`super::Translation::health_checks`].
    pub fn health_checks(&self) -> Vec<super::HealthCheck> {
        self.per_service
            .values()
            .filter_map(|s| s.health_check.clone())
            .collect()
    }

    /// Services translated (those with frontends or problems, and those without either).
    pub fn services(&self) -> usize {
        self.per_service.len()
    }

    /// Takes the current objects; returns the frontend keys whose desired value changed.
    pub fn update(&mut self, objects: &SharedObjects) -> BTreeSet<FrontendKey> {
        let touched = self.inputs.update(objects);
        let node_ips = node_addresses(objects.nodes.iter().map(|n| &**n), &self.cfg);
        let all = self.fresh || node_ips != self.node_ips;
        let mut dirty: BTreeSet<ServiceId> = if all {
            self.per_service
                .keys()
                .chain(self.inputs.services.keys())
                .cloned()
                .collect()
        } else {
            touched.services
        };
        // Pods only matter to Services without slices, but which those are can change with
        // the same update: the whole namespace is re-translated.
        if !all && !touched.namespaces.is_empty() {
            let in_ns = |id: &&ServiceId| touched.namespaces.contains(&id.0);
            dirty.extend(self.inputs.services.keys().filter(in_ns).cloned());
            dirty.extend(self.per_service.keys().filter(in_ns).cloned());
        }
        // Only Services that exist now or had a translation matter (a slice of a Service
        // that never existed changes nothing).
        dirty.retain(|id| {
            self.inputs.services.contains_key(id) || self.per_service.contains_key(id)
        });
        self.fresh = false;
        self.node_ips = node_ips;
        if dirty.is_empty() {
            return BTreeSet::new();
        }
        debug!(
            services = dirty.len(),
            all, "re-translating the changed Services"
        );
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        // Whether the rejected list can differ: a changed Service had or has problems, or a
        // touched key is (or was) contested. Otherwise it is not collected again (that walks
        // every Service, on every change).
        let has_problems =
            |t: &ServiceFrontends| !t.rejected.is_empty() || !t.slice_rejected.is_empty();
        let mut recollect = all;
        for id in &dirty {
            if let Some(old) = self.per_service.remove(id) {
                recollect |= has_problems(&old);
                for (i, fe) in old.frontends.iter().enumerate() {
                    touched.insert(fe.key);
                    if let Some(c) = self.claims.get_mut(&fe.key) {
                        recollect |= c.len() > 1;
                        c.retain(|(owner, at)| !(owner == id && *at == i));
                        if c.is_empty() {
                            self.claims.remove(&fe.key);
                        }
                    }
                }
            }
            let Some(svc) = self.inputs.service(id) else {
                continue;
            };
            let t = translate_service(
                svc,
                self.inputs
                    .slices
                    .get(id)
                    .into_iter()
                    .flatten()
                    .map(|s| &**s),
                self.inputs
                    .pods
                    .get(&id.0)
                    .into_iter()
                    .flatten()
                    .map(|p| &**p),
                &self.node_ips,
                &self.cfg,
            );
            for (i, fe) in t.frontends.iter().enumerate() {
                touched.insert(fe.key);
                let c = self.claims.entry(fe.key).or_default();
                let claim = (id.clone(), i);
                if let Err(at) = c.binary_search(&claim) {
                    c.insert(at, claim);
                }
            }
            recollect |= has_problems(&t);
            self.per_service.insert(id.clone(), t);
        }
        let mut changed = BTreeSet::new();
        let touched_contested = touched
            .iter()
            .any(|k| self.claims.get(k).is_some_and(|c| c.len() > 1));
        for key in touched {
            let owner = self
                .claims
                .get(&key)
                .and_then(|c| c.first())
                .and_then(|(id, i)| self.per_service.get(id)?.frontends.get(*i));
            if self.state.frontends.get(&key) != owner {
                match owner {
                    Some(fe) => self.state.frontends.insert(key, fe.clone()),
                    None => self.state.frontends.remove(&key),
                };
                changed.insert(key);
            }
        }
        recollect |= touched_contested;
        if recollect {
            self.rejected = self.collect_rejected();
        }
        changed
    }

    fn collect_rejected(&self) -> Vec<Rejected> {
        let mut out: Vec<Rejected> = self
            .per_service
            .values()
            .flat_map(|s| s.slice_rejected.iter().cloned())
            .collect();
        for (id, s) in &self.per_service {
            out.extend(s.rejected.iter().cloned());
            for (i, fe) in s.frontends.iter().enumerate() {
                let first = self.claims.get(&fe.key).and_then(|c| c.first());
                // An in-cluster twin's conflict is its frontend's, reported already.
                if fe.key.internal || first.is_some_and(|(owner, at)| owner == id && *at == i) {
                    continue;
                }
                if let Some(owner) = self.state.frontends.get(&fe.key) {
                    out.push(conflict(describe_service(&id.0, &id.1), fe, owner));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
