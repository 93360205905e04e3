//! What users see beyond `debug`:
//! - the minikube-style Service list with node-port URLs (`svc-lb service list`,
//!   `svc-lb debug services --list`) and `svc-lb service NAME --url` ([`list`]); they work
//!   from the pinned maps alone: a frontend's `LB_SVC_NAMES` entry ("namespace/name:port")
//!   says which Service it belongs to, and NodePort frontends carry the node address and port;
//! - `svc-lb debug env`: kubelet's Service environment variables ([`env`]);
//! - the agent's optional servers ([`servers`]): Prometheus metrics ([`metrics`]), a DNS
//!   responder ([`dns`]) and the web dashboard ([`ui`]), fed by the maps and by what the agent
//!   loop records ([`telemetry`]).

pub mod dns;
pub mod env;
pub mod http;
pub mod list;
pub mod metrics;
pub mod servers;
pub mod telemetry;
pub mod ui;

pub use telemetry::Telemetry;

use thiserror::Error;

use crate::{
    cli::{ServiceArgs, ServiceCommand},
    error::MapsError,
    maps::{BpfLbMaps, LbMaps as _},
};

#[derive(Debug, Error)]
pub enum ViewsError {
    #[error(transparent)]
    Maps(#[from] MapsError),

    #[error("cannot encode JSON")]
    Json(#[from] serde_json::Error),

    #[error("service {namespace}/{name} is not programmed (no frontend in the pinned maps)")]
    NotFound { namespace: String, name: String },

    #[error("service {namespace}/{name} has no node port")]
    NoNodePort { namespace: String, name: String },

    #[error("give a Service name, or `list`")]
    NoName,

    #[error("cannot serve {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    Client(#[from] crate::k8s::client::ClientError),

    #[error("cannot list Services from the API server")]
    Api(#[source] Box<kube::Error>),

    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),

    #[error(transparent)]
    Manifests(#[from] crate::k8s::manifest::ManifestError),
}

/// Runs `svc-lb service ...` and returns what to print.
pub fn service(args: &ServiceArgs) -> Result<String, ViewsError> {
    match &args.command {
        Some(ServiceCommand::List(l)) => {
            let maps = BpfLbMaps::open(&l.common.pin.pin_dir)?;
            let rows = list::rows(&maps.dump()?);
            Ok(list::render(
                &list::filter(rows, l.namespaces.namespace.as_deref()),
                l.common.output,
            )?)
        }
        None => {
            let name = args.name.as_deref().ok_or(ViewsError::NoName)?;
            let maps = BpfLbMaps::open(&args.pin.pin_dir)?;
            let rows = list::rows(&maps.dump()?);
            let namespace = args.namespace.as_str();
            let row = rows
                .into_iter()
                .find(|r| r.namespace == namespace && r.name == name)
                .ok_or_else(|| ViewsError::NotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                })?;
            if args.url {
                if row.urls.is_empty() {
                    return Err(ViewsError::NoNodePort {
                        namespace: namespace.into(),
                        name: name.into(),
                    });
                }
                return Ok(list::render_urls(&row));
            }
            let format = args.output;
            Ok(list::render(std::slice::from_ref(&row), format)?)
        }
    }
}

/// Table or JSON, shared by the views.
pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}
