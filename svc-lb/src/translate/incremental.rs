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
    collections::{BTreeMap, BTreeSet, HashMap},
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

fn same_all<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
}

/// Objects grouped the way one Service's translation reads them.
#[derive(Debug, Default)]
struct Inputs {
    services: BTreeMap<ServiceId, Arc<Service>>,
    /// By owning Service, in the order given (slices without the label are never read).
    slices: HashMap<ServiceId, Vec<Arc<EndpointSlice>>>,
    /// By namespace.
    pods: HashMap<String, Vec<Arc<Pod>>>,
}

impl Inputs {
    fn new(objects: &SharedObjects) -> Self {
        let mut inputs = Inputs::default();
        for svc in &objects.services {
            // The first of two objects with one name wins, as in `translate`.
            inputs
                .services
                .entry(service_id(svc))
                .or_insert_with(|| svc.clone());
        }
        for slice in &objects.endpoint_slices {
            if let Some(owner) = slice_owner(slice) {
                inputs.slices.entry(owner).or_default().push(slice.clone());
            }
        }
        for pod in &objects.pods {
            let ns = namespace(&pod.metadata).to_owned();
            inputs.pods.entry(ns).or_default().push(pod.clone());
        }
        inputs
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
    claims: HashMap<FrontendKey, BTreeSet<(ServiceId, usize)>>,
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
        let next = Inputs::new(objects);
        let node_ips = node_addresses(objects.nodes.iter().map(|n| &**n), &self.cfg);
        let all = self.fresh || node_ips != self.node_ips;
        let dirty: BTreeSet<ServiceId> = if all {
            self.per_service
                .keys()
                .chain(next.services.keys())
                .cloned()
                .collect()
        } else {
            self.dirty(&next)
        };
        self.fresh = false;
        self.node_ips = node_ips;
        self.inputs = next;
        if dirty.is_empty() {
            return BTreeSet::new();
        }
        debug!(
            services = dirty.len(),
            all, "re-translating the changed Services"
        );
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for id in &dirty {
            if let Some(old) = self.per_service.remove(id) {
                for (i, fe) in old.frontends.iter().enumerate() {
                    touched.insert(fe.key);
                    if let Some(c) = self.claims.get_mut(&fe.key) {
                        c.remove(&(id.clone(), i));
                        if c.is_empty() {
                            self.claims.remove(&fe.key);
                        }
                    }
                }
            }
            let Some(svc) = self.inputs.services.get(id) else {
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
                self.claims
                    .entry(fe.key)
                    .or_default()
                    .insert((id.clone(), i));
            }
            self.per_service.insert(id.clone(), t);
        }
        let mut changed = BTreeSet::new();
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
        self.rejected = self.collect_rejected();
        changed
    }

    /// Services whose inputs differ between the last objects and `next`.
    fn dirty(&self, next: &Inputs) -> BTreeSet<ServiceId> {
        let prev = &self.inputs;
        let mut dirty = BTreeSet::new();
        for (id, svc) in &next.services {
            if !prev.services.get(id).is_some_and(|p| same(p, svc)) {
                dirty.insert(id.clone());
            }
        }
        for id in prev.services.keys() {
            if !next.services.contains_key(id) {
                dirty.insert(id.clone());
            }
        }
        for (owner, slices) in &next.slices {
            if !same_all(prev.slices.get(owner).map_or(&[], |v| &v[..]), slices) {
                dirty.insert(owner.clone());
            }
        }
        for owner in prev.slices.keys() {
            if !next.slices.contains_key(owner) {
                dirty.insert(owner.clone());
            }
        }
        // Pods only matter to Services without slices, but which those are can change with
        // the same update: the whole namespace is re-translated.
        let namespaces: BTreeSet<&String> = next
            .pods
            .iter()
            .filter(|(ns, pods)| !same_all(prev.pods.get(*ns).map_or(&[], |v| &v[..]), pods))
            .map(|(ns, _)| ns)
            .chain(prev.pods.keys().filter(|ns| !next.pods.contains_key(*ns)))
            .collect();
        for ns in namespaces {
            let in_ns = |id: &&ServiceId| id.0 == *ns;
            dirty.extend(next.services.keys().filter(in_ns).cloned());
            dirty.extend(prev.services.keys().filter(in_ns).cloned());
        }
        // Only Services that exist now or had a translation matter (a slice of a Service
        // that never existed changes nothing).
        dirty.retain(|id| next.services.contains_key(id) || self.per_service.contains_key(id));
        dirty
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
                if first.is_some_and(|(owner, at)| owner == id && *at == i) {
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
