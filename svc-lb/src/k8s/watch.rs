//! API mode: Services, EndpointSlices and this node's Node object, kept in reflector stores by
//! kube's watchers (initial list, watch from its resourceVersion, bookmarks, re-list after
//! `410 Gone`, exponential backoff while the API server is unreachable).
//!
//! The stores are only read once every initial list completed ([`ClusterWatch::wait_synced`]):
//! a desired state built from a partial list would delete what is programmed. Every change
//! afterwards wakes [`ClusterWatch::changed`]; the caller coalesces bursts and rebuilds the
//! desired state from the stores with [`ClusterWatch::objects`] (the same translation as
//! manifest mode).
//!
//! Like kube-proxy (which uses the same label selectors on its informers), svc-lb ignores
//! Services and EndpointSlices labelled `service.kubernetes.io/service-proxy-name` (another
//! proxy owns them), EndpointSlices of headless Services, EndpointSlices without the
//! `kubernetes.io/service-name` label, and EndpointSlices of other address families. Pods are
//! not watched: EndpointSlices are the endpoints source.

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use super::manifest::Objects;
use crate::{error::chain, translate::SharedObjects};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services (and their slices) with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Verbs the agent uses on every resource it reads (the watcher lists and watches; `get` is
/// granted like kube-proxy's role has it, for `kubectl auth can-i` style checks).
pub const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// An API resource the agent reads, with [`READ_VERBS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiAccess {
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// Plural resource name, as RBAC rules and URLs spell it.
    pub resource: &'static str,
}

impl ApiAccess {
    pub const fn of<K: k8s_openapi::Resource>() -> Self {
        Self {
            group: K::GROUP,
            resource: K::URL_PATH_SEGMENT,
        }
    }
}

/// Everything the agent calls on the API server. [`ClusterWatch::start`] watches exactly these
/// types, and the DaemonSet's ClusterRole grants exactly this (checked by a test).
pub const API_ACCESS: [ApiAccess; 3] = [
    ApiAccess::of::<Service>(),
    ApiAccess::of::<EndpointSlice>(),
    ApiAccess::of::<Node>(),
];

/// Label selector of the Service watch.
pub fn service_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// Label selector of the EndpointSlice watch.
pub fn slice_selector() -> String {
    format!("{SERVICE_NAME_LABEL},!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// Field selector of the Node watch: only this node.
pub fn node_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// The three reflector stores and the tasks feeding them. Dropping it stops the watches.
pub struct ClusterWatch {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    node_name: String,
    changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterWatch {
    /// Starts the watchers (on the current tokio runtime). They retry forever with backoff;
    /// errors are logged, once per distinct error and watcher.
    pub fn start(client: Client, node_name: &str) -> ClusterWatch {
        let changed = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let services = spawn(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&service_selector()),
            changed.clone(),
            &mut tasks,
        );
        let slices = spawn(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&slice_selector()),
            changed.clone(),
            &mut tasks,
        );
        let nodes = spawn(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_selector(node_name)),
            changed.clone(),
            &mut tasks,
        );
        ClusterWatch {
            services,
            slices,
            nodes,
            node_name: node_name.to_owned(),
            changed,
            tasks,
        }
    }

    /// Resolves once every watcher completed its first full list.
    pub async fn wait_synced(&self) {
        // `Err` only when a writer was dropped, i.e. its task ended: never while we hold it.
        let _ = futures::join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.nodes.wait_until_ready(),
        );
    }

    /// Resolves at the next change of any store (an event since the last call counts).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A snapshot of the stores, without what svc-lb ignores. Only meaningful after
    /// [`Self::wait_synced`].
    pub fn objects(&self) -> Objects {
        let mut o = self.shared().to_objects();
        o.services.sort_by(|a, b| key(a).cmp(&key(b)));
        o.endpoint_slices.sort_by(|a, b| key(a).cmp(&key(b)));
        o
    }

    /// [`Self::objects`] sharing the stores' objects instead of copying them, in no particular
    /// order: what the agent takes after every change (an unchanged object keeps its
    /// allocation, which is how the translator recognises it cheaply; the translation does not
    /// depend on the order, so 20k objects are not sorted on every event).
    pub fn shared(&self) -> SharedObjects {
        let own = |labels: &std::collections::BTreeMap<String, String>| {
            !labels.contains_key(SERVICE_PROXY_NAME_LABEL)
        };
        let services: Vec<Arc<Service>> = self
            .services
            .state()
            .into_iter()
            .filter(|s| own(s.labels()))
            .collect();
        let endpoint_slices: Vec<Arc<EndpointSlice>> = self
            .slices
            .state()
            .into_iter()
            .filter(|s| {
                let l = s.labels();
                own(l)
                    && !l.contains_key(HEADLESS_LABEL)
                    && l.contains_key(SERVICE_NAME_LABEL)
                    && s.address_type == "IPv4"
            })
            .collect();
        let nodes = self
            .nodes
            .state()
            .into_iter()
            .filter(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .collect();
        SharedObjects {
            services,
            endpoint_slices,
            pods: Vec::new(),
            nodes,
        }
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key<K: Resource>(o: &K) -> (Option<&str>, Option<&str>) {
    let m = o.meta();
    (m.namespace.as_deref(), m.name.as_deref())
}

/// Starts one watcher + reflector task and returns its store.
fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + DeserializeOwned + Debug,
    K: Send + Sync + 'static,
{
    let access = ApiAccess::of::<K>();
    debug_assert!(
        API_ACCESS.contains(&access),
        "{access:?} is not in API_ACCESS (the ClusterRole would not allow it)"
    );
    let (store, writer) = reflector::store::<K>();
    let reader = store.clone();
    let stream = watcher(api, config)
        .default_backoff()
        // Nobody reads managedFields; they are often the largest part of an object.
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer);
    tasks.push(tokio::spawn(async move {
        let resource = access.resource;
        let mut stream = std::pin::pin!(stream);
        let mut failing: Option<String> = None;
        let mut listed_once = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if failing.take().is_some() {
                        info!(resource, "watch recovered");
                    }
                    match ev {
                        watcher::Event::Init => debug!(resource, "listing"),
                        watcher::Event::InitApply(_) => {}
                        watcher::Event::InitDone => {
                            let n = reader.len();
                            if listed_once {
                                info!(resource, objects = n, "re-listed");
                            } else {
                                info!(resource, objects = n, "initial list complete");
                            }
                            listed_once = true;
                            changed.notify_one();
                        }
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                            debug!(resource, name = %o.name_any(), "changed");
                            changed.notify_one();
                        }
                    }
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    info!(resource, "watch expired (410 Gone): re-listing");
                }
                Err(e) => {
                    let msg = chain(&e);
                    if failing.as_deref() != Some(msg.as_str()) {
                        warn!(resource, "watch failed, retrying with backoff: {msg}");
                    } else {
                        debug!(resource, "watch still failing: {msg}");
                    }
                    failing = Some(msg);
                }
            }
        }
    }));
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_access_is_what_kube_proxy_reads() {
        assert_eq!(
            API_ACCESS,
            [
                ApiAccess {
                    group: "",
                    resource: "services"
                },
                ApiAccess {
                    group: "discovery.k8s.io",
                    resource: "endpointslices"
                },
                ApiAccess {
                    group: "",
                    resource: "nodes"
                },
            ]
        );
    }

    #[test]
    fn selectors() {
        assert_eq!(
            service_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(
            slice_selector(),
            "kubernetes.io/service-name,!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(node_selector("n1"), "metadata.name=n1");
    }
}
