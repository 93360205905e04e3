//! Starts the optional servers of `svc-lb run` (`--metrics-addr`, `--dns-listen`, `--ui`). Each
//! binds before the datapath is loaded, so a taken address fails startup.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tracing::{info, warn};

use super::{
    ViewsError, dns,
    http::{self, Handler, Response},
    metrics,
    telemetry::Telemetry,
    ui,
};
use crate::{
    cli::ViewArgs,
    maps::{BpfLbMaps, MapsError},
};

/// The pinned maps, opened on first use: the servers bind before the datapath is loaded (a
/// taken address must fail before the node is touched), when the pins may not exist yet.
pub(crate) struct LazyMaps {
    pin_dir: PathBuf,
    maps: Mutex<Option<BpfLbMaps>>,
}

impl LazyMaps {
    pub fn new(pin_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            pin_dir: pin_dir.to_path_buf(),
            maps: Mutex::new(None),
        })
    }

    /// Runs `f` on the maps, opening them first if needed.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&BpfLbMaps) -> Result<T, MapsError>,
    ) -> Result<T, MapsError> {
        let mut guard = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(BpfLbMaps::open(&self.pin_dir)?);
        }
        let maps = guard.as_ref().expect("opened above");
        f(maps)
    }
}

/// Starts whatever `args` asks for; returns once every server is bound.
pub async fn start(
    args: &ViewArgs,
    pin_dir: &Path,
    telemetry: &Telemetry,
) -> Result<(), ViewsError> {
    if let Some(addr) = args.metrics_addr {
        let maps = LazyMaps::new(pin_dir);
        let bound = http::serve(addr, metrics_handler(maps, telemetry.clone()))
            .await
            .map_err(|source| ViewsError::Bind {
                what: "metrics",
                addr,
                source,
            })?;
        info!(addr = %bound, "Prometheus metrics on /metrics");
    }
    if let Some(addr) = args.dns_listen {
        let zone = dns::zone(&args.cluster_domain).map_err(ViewsError::Config)?;
        let socket =
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| ViewsError::Bind {
                    what: "DNS",
                    addr,
                    source,
                })?;
        info!(addr = %socket.local_addr().unwrap_or(addr), zone = %zone, "DNS responder (UDP and TCP)");
        // The same port over TCP, where clients retry answers too large for UDP.
        let tcp_addr = socket.local_addr().unwrap_or(addr);
        let listener = tokio::net::TcpListener::bind(tcp_addr)
            .await
            .map_err(|source| ViewsError::Bind {
                what: "DNS over TCP",
                addr: tcp_addr,
                source,
            })?;
        let t = telemetry.clone();
        dns::spawn(socket, zone.clone(), move || t.objects());
        let t = telemetry.clone();
        dns::spawn_tcp(listener, zone, move || t.objects());
    }
    if let Some(addr) = args.ui {
        if !addr.ip().is_loopback() {
            warn!(%addr, "the dashboard has no authentication and listens beyond loopback");
        }
        let maps = LazyMaps::new(pin_dir);
        let bound = http::serve(addr, ui_handler(maps, telemetry.clone()))
            .await
            .map_err(|source| ViewsError::Bind {
                what: "the dashboard",
                addr,
                source,
            })?;
        info!(url = %format!("http://{bound}/"), "dashboard");
    }
    Ok(())
}

/// A copy of the telemetry without the objects (the views that use this do not need them),
/// taken quickly so the agent loop never waits on a map dump.
fn snapshot(telemetry: &Telemetry) -> super::telemetry::State {
    let t = telemetry.lock();
    super::telemetry::State {
        sync_latency: t.sync_latency.clone(),
        syncs_ok: t.syncs_ok,
        syncs_failed: t.syncs_failed,
        last_sync_unix: t.last_sync_unix,
        rejected: t.rejected.clone(),
        objects: Default::default(),
    }
}

fn ui_handler(maps: Arc<LazyMaps>, telemetry: Telemetry) -> Handler {
    Arc::new(move |path: &str| match path {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", ui::INDEX_HTML),
        "/api/state" => {
            let state = snapshot(&telemetry);
            let json = maps
                .with(|m| ui::state(m, &state))
                .map_err(|e| crate::error::chain(&e))
                .and_then(|s| serde_json::to_vec(&s).map_err(|e| e.to_string()));
            match json {
                Ok(body) => Response::ok("application/json", body),
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        }
        _ => Response::text(404, "not found\n"),
    })
}

fn metrics_handler(maps: Arc<LazyMaps>, telemetry: Telemetry) -> Handler {
    Arc::new(move |path: &str| match path {
        "/metrics" => {
            let state = snapshot(&telemetry);
            match maps.with(|m| metrics::render(m, &state)) {
                Ok(body) => Response::ok(metrics::CONTENT_TYPE, body),
                Err(e) => Response::text(500, format!("{}\n", crate::error::chain(&e))),
            }
        }
        "/" => Response::ok("text/plain; charset=utf-8", "svc-lb metrics: /metrics\n"),
        _ => Response::text(404, "not found\n"),
    })
}
