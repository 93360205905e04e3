//! What users read about a node, on demand, from the command line:
//! - `svc-lb debug services|backends|conntrack|stats` ([`debug`]): from the pinned maps only,
//!   so it works while an agent runs and after it stopped;
//! - the minikube-style Service list with node-port URLs (`svc-lb service list`,
//!   `svc-lb debug services --list`) and `svc-lb service NAME --url` ([`list`]): a frontend's
//!   `LB_SVC_NAMES` entry ("namespace/name:port") says which Service it belongs to, and
//!   NodePort frontends carry the node address and port;
//! - `svc-lb debug env`: kubelet's Service environment variables ([`env`]);
//! - the row builders ([`rows`]) and the text table ([`table`]) those views share with the
//!   agent's metrics and dashboard (`crate::serve`), which build on them rather than on the
//!   views themselves.
//!
//! Layer: may import `model`, `k8s`, `translate`, `dataplane`, `maps`, `reconcile`, `cli` and
//! `error`; never `serve` or `agent` (they import this).

pub mod debug;
pub mod env;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod list;
pub mod rows;
pub mod table;

use thiserror::Error;

use crate::maps::MapsError;

/// `svc-lb debug` and `svc-lb service`.
#[derive(Debug, Error)]
pub enum InspectError {
    #[error(transparent)]
    Maps(#[from] MapsError),

    #[error("cannot encode JSON")]
    Json(#[from] serde_json::Error),

    #[error("cannot read the monotonic clock")]
    Clock(#[source] std::io::Error),

    #[error("service {namespace}/{name} is not programmed (no frontend in the pinned maps)")]
    NotFound { namespace: String, name: String },

    #[error("service {namespace}/{name} has no node port")]
    NoNodePort { namespace: String, name: String },

    #[error("give a Service name, or `list`")]
    NoName,

    #[error(transparent)]
    Client(#[from] crate::k8s::client::ClientError),

    #[error("cannot list Services from the API server")]
    Api(#[source] Box<kube::Error>),

    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),

    #[error(transparent)]
    Manifests(#[from] crate::k8s::manifest::ManifestError),
}

/// Pretty JSON with a final newline, the `-o json` form of every view.
pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}
