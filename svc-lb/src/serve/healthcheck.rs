//! Load balancer health checks (`spec.healthCheckNodePort`), answered like kube-proxy's
//! `pkg/proxy/healthcheck/service_health.go`: for every LoadBalancer Service with
//! externalTrafficPolicy Local, an HTTP server on its health check port (all node addresses,
//! kube-proxy's default without `--nodeport-addresses`) answers any request with the JSON
//! `{"service": {"namespace": .., "name": ..}, "localEndpoints": N, "serviceProxyHealthy": ..}`
//! (tab-indented, byte for byte as kube-proxy writes it, see `response` and its test),
//! with status 200 when the node has ready local endpoints and the proxy is healthy, 503
//! otherwise, so the cloud load balancer only sends to nodes that can serve without leaving
//! the node. Listeners open and close as Services come and go; counts follow every sync.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::http::{self, Handler, Limits, Request, Response};
use crate::translate::HealthCheck;

/// What one Service's server answers with; the counts change under a running server.
#[derive(Debug)]
struct Served {
    namespace: String,
    name: String,
    local_endpoints: AtomicUsize,
    proxy_healthy: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Instance {
    port: u16,
    served: Arc<Served>,
    task: JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Aborting the accept loop drops its listener, which closes the port.
        self.task.abort();
    }
}

/// The health check servers of one agent. Must be used inside a tokio runtime.
#[derive(Debug)]
pub struct HealthChecks {
    /// Listen address (port replaced per Service): 0.0.0.0 in the agent, loopback in tests.
    addr: Ipv4Addr,
    /// (namespace, name) -> its running server.
    services: BTreeMap<(String, String), Instance>,
    /// Services whose port could not be bound, with that port: warned about once, retried
    /// on every sync.
    failed: BTreeMap<(String, String), u16>,
    proxy_healthy: Arc<AtomicBool>,
}

impl HealthChecks {
    /// Servers listening on every address of the node.
    pub fn new() -> Self {
        Self::on(Ipv4Addr::UNSPECIFIED)
    }

    /// Servers listening on `addr` only.
    pub fn on(addr: Ipv4Addr) -> Self {
        Self {
            addr,
            services: BTreeMap::new(),
            failed: BTreeMap::new(),
            // Until the first sync says otherwise: the counts are 0 then anyway.
            proxy_healthy: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Makes the servers match `checks`: closes those of Services that are gone or changed
    /// port, opens new ones (a port that cannot be bound is logged and retried on the next
    /// sync, like kube-proxy), and updates every count.
    pub fn sync(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<(String, String), &HealthCheck> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c))
            .collect();
        self.services.retain(|id, inst| {
            let keep = wanted.get(id).is_some_and(|c| c.port == inst.port);
            if !keep {
                info!(service = %format!("{}/{}", id.0, id.1), port = inst.port, "closing health check");
            }
            keep
        });
        self.failed
            .retain(|id, port| wanted.get(id).is_some_and(|c| c.port == *port));
        for (id, check) in wanted {
            if let Some(inst) = self.services.get(&id) {
                inst.served
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let served = Arc::new(Served {
                namespace: check.namespace.clone(),
                name: check.name.clone(),
                local_endpoints: AtomicUsize::new(check.local_endpoints),
                proxy_healthy: self.proxy_healthy.clone(),
            });
            match self.open(check.port, served.clone()) {
                Ok(task) => {
                    self.failed.remove(&id);
                    info!(
                        service = %format!("{}/{}", check.namespace, check.name),
                        port = check.port,
                        local_endpoints = check.local_endpoints,
                        "serving health check"
                    );
                    self.services.insert(
                        id,
                        Instance {
                            port: check.port,
                            served,
                            task,
                        },
                    );
                }
                Err(e) => {
                    if self.failed.insert(id, check.port) != Some(check.port) {
                        warn!(
                            service = %format!("{}/{}", check.namespace, check.name),
                            port = check.port,
                            "cannot serve health check (retried on every sync): {e}"
                        );
                    }
                }
            }
        }
    }

    /// Whether the proxy itself is healthy (the last reconcile succeeded): reported as
    /// `serviceProxyHealthy`, and a 503 for every Service while it is false.
    pub fn set_proxy_healthy(&self, healthy: bool) {
        self.proxy_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.services.values().map(|i| i.port).collect()
    }

    fn open(&self, port: u16, served: Arc<Served>) -> std::io::Result<JoinHandle<()>> {
        // Bound synchronously so a taken port is reported by this sync, not lost in a task.
        let listener = http::bind_now(SocketAddr::from((self.addr, port)))?;
        // kube-proxy answers every method and path the same way.
        let handler: Handler = Arc::new(move |_: &Request| {
            let (status, body) = response(
                &served.namespace,
                &served.name,
                served.local_endpoints.load(Ordering::Relaxed),
                served.proxy_healthy.load(Ordering::Relaxed),
            );
            Response {
                status,
                content_type: "application/json",
                body: body.into_bytes(),
                headers: vec![("x-content-type-options", "nosniff")],
            }
        });
        Ok(http::spawn(listener, handler, Limits::HEALTH))
    }
}

impl Default for HealthChecks {
    fn default() -> Self {
        Self::new()
    }
}

/// Status and body exactly as kube-proxy writes them (tab-indented, no trailing newline).
fn response(namespace: &str, name: &str, local_endpoints: usize, healthy: bool) -> (u16, String) {
    let status = if local_endpoints != 0 && healthy {
        200
    } else {
        503
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        json_string(namespace),
        json_string(name)
    );
    (status, body)
}

/// Kubernetes names are DNS labels, but quote properly anyway.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::http::tests::get;
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpStream;

    fn check(name: &str, port: u16, n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            port,
            local_endpoints: n,
        }
    }

    /// The body kube-proxy's handler produces (fmt.Sprintf of its dedented template, trimmed).
    #[test]
    fn body_matches_kube_proxy() {
        let (status, body) = response("default", "web", 2, true);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(response("default", "web", 0, true).0, 503);
        assert_eq!(response("default", "web", 3, false).0, 503);
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn probe(port: u16) -> String {
        get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "GET", "/").await
    }

    #[tokio::test]
    async fn servers_follow_services_and_counts() {
        let mut hc = HealthChecks::on(Ipv4Addr::LOCALHOST);
        let (p1, p2) = (free_port(), free_port());
        hc.sync(&[check("web", p1, 0), check("api", p2, 2)]);
        assert_eq!(hc.ports().len(), 2);
        let web = probe(p1).await;
        assert!(
            web.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{web}"
        );
        assert!(web.contains("X-Content-Type-Options: nosniff\r\n"), "{web}");
        assert!(web.contains("\"localEndpoints\": 0"), "{web}");
        let api = probe(p2).await;
        assert!(api.starts_with("HTTP/1.1 200 OK\r\n"), "{api}");
        assert!(api.contains("Content-Type: application/json\r\n"), "{api}");
        assert!(api.contains("\"name\": \"api\""), "{api}");

        // Endpoints change: the same server answers with the new count.
        hc.sync(&[check("web", p1, 1), check("api", p2, 2)]);
        assert!(probe(p1).await.contains("\"localEndpoints\": 1"));
        // The proxy turns unhealthy: 503 everywhere, and it says so.
        hc.set_proxy_healthy(false);
        let api = probe(p2).await;
        assert!(api.starts_with("HTTP/1.1 503 "), "{api}");
        assert!(api.contains("\"serviceProxyHealthy\": false"), "{api}");
        hc.set_proxy_healthy(true);

        // A Service goes away: its port closes; the other keeps serving.
        hc.sync(&[check("web", p1, 1)]);
        tokio::task::yield_now().await;
        let refused = wait_closed(p2).await;
        assert!(refused, "port {p2} still open after its Service left");
        assert!(probe(p1).await.starts_with("HTTP/1.1 200 "));
        // A port change moves the server.
        let p3 = free_port();
        hc.sync(&[check("web", p3, 1)]);
        assert!(wait_closed(p1).await);
        assert!(probe(p3).await.contains("\"name\": \"web\""));
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_on_the_next_sync() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut hc = HealthChecks::on(Ipv4Addr::LOCALHOST);
        hc.sync(&[check("web", port, 1)]);
        assert!(hc.ports().is_empty());
        drop(taken);
        hc.sync(&[check("web", port, 1)]);
        assert_eq!(hc.ports(), [port]);
        assert!(probe(port).await.starts_with("HTTP/1.1 200 "));
    }

    /// Waits up to 2 s for connections to `port` to be refused.
    async fn wait_closed(port: u16) -> bool {
        for _ in 0..100 {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
