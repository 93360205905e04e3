//! Starts the optional servers of `svc-lb run` (`--metrics-addr`, `--dns-listen`, `--ui`). Each
//! binds before the datapath is loaded, so a taken address fails startup.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tracing::{debug, info, warn};

use super::{
    ServeError, dns,
    hosts::AllowedHosts,
    http::{self, Handler, Limits, Request, Response},
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
) -> Result<(), ServeError> {
    if let Some(addr) = args.metrics_addr {
        if let Some(w) = exposure_warning("the metrics endpoint", addr) {
            warn!(%addr, "{w}");
        }
        let maps = LazyMaps::new(pin_dir);
        let (bound, _) = http::serve(
            addr,
            metrics_handler(maps, telemetry.clone()),
            Limits::VIEWS,
        )
        .await
        .map_err(|source| ServeError::Bind {
            what: "metrics",
            addr,
            source,
        })?;
        info!(addr = %bound, "Prometheus metrics on /metrics");
    }
    if let Some(addr) = args.dns_listen {
        if let Some(w) = exposure_warning("the DNS responder", addr) {
            warn!(%addr, "{w}");
        }
        let zone = dns::zone(&args.cluster_domain).map_err(ServeError::Config)?;
        let socket =
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: "DNS",
                    addr,
                    source,
                })?;
        info!(addr = %socket.local_addr().unwrap_or(addr), zone = %zone, "DNS responder (UDP and TCP)");
        // The same port over TCP, where clients retry answers too large for UDP.
        let tcp_addr = socket.local_addr().unwrap_or(addr);
        let listener = tokio::net::TcpListener::bind(tcp_addr)
            .await
            .map_err(|source| ServeError::Bind {
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
        let hosts = AllowedHosts::new(&args.ui_allowed_hosts);
        let (bound, _) = http::serve(
            addr,
            ui_handler(maps, telemetry.clone(), hosts),
            Limits::VIEWS,
        )
        .await
        .map_err(|source| ServeError::Bind {
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

/// The warning for a server that listens on every address of the node (`0.0.0.0`, `::`):
/// an operator who meant loopback or one interface should hear it, like for the dashboard.
pub fn exposure_warning(what: &str, addr: SocketAddr) -> Option<String> {
    addr.ip().is_unspecified().then(|| {
        format!(
            "{what} listens on every address of the node, without authentication; give one \
             address (e.g. 127.0.0.1:{}) to keep it local",
            addr.port()
        )
    })
}

fn ui_handler(maps: Arc<LazyMaps>, telemetry: Telemetry, hosts: AllowedHosts) -> Handler {
    Arc::new(move |req: &Request| {
        if !req.is_read() {
            return Response::only_get("text/plain; charset=utf-8", "GET only\n");
        }
        // DNS rebinding: a page of another site must not read the state (see `hosts`).
        if let Err(why) = hosts.check(req) {
            debug!(host = ?req.host, origin = ?req.origin, "dashboard request refused: {why}");
            return Response::text(403, format!("{why}\n"));
        }
        ui_route(&req.path, &maps, &telemetry)
    })
}

fn ui_route(path: &str, maps: &LazyMaps, telemetry: &Telemetry) -> Response {
    match path {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", ui::INDEX_HTML),
        "/api/state" => {
            let state = snapshot(telemetry);
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
    }
}

fn metrics_handler(maps: Arc<LazyMaps>, telemetry: Telemetry) -> Handler {
    Arc::new(move |req: &Request| match req.path.as_str() {
        _ if !req.is_read() => Response::only_get("text/plain; charset=utf-8", "GET only\n"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::http::tests::raw;

    #[test]
    fn servers_on_every_address_are_warned_about() {
        let w = exposure_warning("the metrics endpoint", "0.0.0.0:9963".parse().unwrap());
        assert!(w.is_some_and(
            |w| w.starts_with("the metrics endpoint listens on every address")
                && w.contains("127.0.0.1:9963")
        ));
        assert!(exposure_warning("the DNS responder", "[::]:53".parse().unwrap()).is_some());
        for quiet in ["127.0.0.1:53", "10.0.0.5:53", "[::1]:53"] {
            assert_eq!(
                exposure_warning("x", quiet.parse().unwrap()),
                None,
                "{quiet}"
            );
        }
    }

    /// DNS rebinding: the dashboard refuses a foreign `Host`, and a foreign `Origin` on its
    /// API, before it touches the maps (there are none here: an allowed API request fails
    /// with 500 on the missing pins, a refused one never gets that far).
    #[tokio::test]
    async fn the_dashboard_answers_its_own_names_only() {
        let pins = std::env::temp_dir().join(format!("svc-lb-ui-hosts-{}", std::process::id()));
        let handler = ui_handler(
            LazyMaps::new(&pins),
            Telemetry::new(),
            AllowedHosts::new(&["node-1.example".into()]),
        );
        let (addr, _) = http::serve("127.0.0.1:0".parse().unwrap(), handler, Limits::VIEWS)
            .await
            .unwrap();
        let ask = |path: &str, host: &str, origin: Option<&str>| {
            let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{origin}Connection: close\r\n\r\n");
            async move { raw(addr, &req).await }
        };
        let page = ask("/", &addr.to_string(), None).await;
        assert!(page.starts_with("HTTP/1.1 200 "), "{page}");
        assert!(
            ask("/", "node-1.example:9964", None)
                .await
                .starts_with("HTTP/1.1 200 ")
        );
        assert!(
            ask("/", "localhost", None)
                .await
                .starts_with("HTTP/1.1 200 ")
        );
        let rebound = ask("/api/state", "evil.example:9964", None).await;
        assert!(rebound.starts_with("HTTP/1.1 403 "), "{rebound}");
        assert!(rebound.contains("--ui-allowed-host"), "{rebound}");
        assert!(
            ask("/", "evil.example", None)
                .await
                .starts_with("HTTP/1.1 403 ")
        );
        let foreign = ask("/api/state", &addr.to_string(), Some("http://evil.example")).await;
        assert!(foreign.starts_with("HTTP/1.1 403 "), "{foreign}");
        // Its own origin passes the check (and fails later only because there are no maps).
        let own = ask(
            "/api/state",
            &addr.to_string(),
            Some(&format!("http://{addr}")),
        )
        .await;
        assert!(own.starts_with("HTTP/1.1 500 "), "{own}");
    }
}
