//! Kubernetes objects: reading them from manifests (standalone mode) or watching the API server
//! (API mode), and the label-selector semantics the Service -> Pod mapping relies on.

pub mod alloc;
pub mod client;
mod documents;
pub mod manifest;
pub mod selector;
pub mod watch;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Namespace an object lives in; `kubectl apply` puts objects without one in `default`.
pub(crate) fn namespace(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => "default",
        Some(ns) => ns,
    }
}

/// `Kind ns/name` as users see it in messages (`Node name` for cluster-scoped kinds).
pub(crate) fn describe(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    let name = name.filter(|n| !n.is_empty()).unwrap_or("<no name>");
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}
