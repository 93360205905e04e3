//! The agent's servers, all optional but the health endpoint:
//! - one HTTP/1.1 accept loop ([`http`], hyper) shared by Prometheus metrics ([`metrics`]), the
//!   web dashboard ([`ui`], with its `Host`/`Origin` check in [`hosts`]), the agent's
//!   `/healthz` and `/livez` ([`health`]) and the healthCheckNodePort servers of
//!   LoadBalancer Services with externalTrafficPolicy Local ([`healthcheck`]);
//! - a DNS responder for the cluster domain ([`dns`]);
//! - what the agent loop records for them ([`telemetry`]), and [`servers`], which starts
//!   the optional ones from `svc-lb run`'s flags.
//!
//! The metrics and the dashboard are built from the maps through `crate::inspect`'s row
//! builders, like `svc-lb debug`. Layer: may import everything below `agent` (`inspect`,
//! `cli`, `reconcile`, `maps`, `dataplane`, `translate`, `k8s`, `model`, `error`), never
//! `agent`.

pub mod dns;
pub mod health;
pub mod healthcheck;
pub mod hosts;
pub mod http;
pub mod metrics;
pub mod servers;
pub mod telemetry;
pub mod ui;

pub use telemetry::Telemetry;

use thiserror::Error;

/// Starting the agent's servers.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot serve {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Config(String),
}
