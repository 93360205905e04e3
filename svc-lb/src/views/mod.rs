//! The agent's optional servers ([`servers`]): Prometheus metrics ([`metrics`]), a DNS
//! responder ([`dns`]) and the web dashboard ([`ui`]), fed by the maps (through the row
//! builders of `crate::inspect`) and by what the agent loop records ([`telemetry`]).

pub mod dns;
pub mod http;
pub mod metrics;
pub mod servers;
pub mod telemetry;
pub mod ui;

pub use telemetry::Telemetry;

use thiserror::Error;

/// Starting the agent's optional servers.
#[derive(Debug, Error)]
pub enum ViewsError {
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
