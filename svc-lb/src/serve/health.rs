//! A tiny local HTTP health endpoint for API mode (kubelet probes, like kube-proxy's healthz):
//!
//! - `/healthz`: 200 once the maps were programmed from a complete list and the last reconcile
//!   succeeded, 503 before (readiness);
//! - `/livez`: 200 while the agent's event loop runs (liveness).
//!
//! Served by the agent's one HTTP server ([`super::http`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use super::http::{self, Handler, Limits, Request, Response};

/// Shared between the agent loop (writer) and the server (reader).
#[derive(Debug, Default)]
pub struct HealthState {
    synced: AtomicBool,
    healthy: AtomicBool,
    /// Unix seconds of the last successful reconcile (0 = never).
    last_ok: std::sync::atomic::AtomicU64,
}

impl HealthState {
    /// Records a reconcile result (the first call also marks the initial sync).
    pub fn reconciled(&self, ok: bool) {
        self.synced.store(true, Ordering::Relaxed);
        self.healthy.store(ok, Ordering::Relaxed);
        if ok {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_ok.store(now.as_secs(), Ordering::Relaxed);
        }
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.healthy.load(Ordering::Relaxed)
    }
}

/// Binds `addr` (so a taken port is a startup error) and serves in a background task.
pub async fn serve(addr: SocketAddr, state: Arc<HealthState>) -> std::io::Result<()> {
    let handler: Handler = Arc::new(move |req: &Request| route(req, &state));
    http::serve(addr, handler, Limits::HEALTH).await?;
    Ok(())
}

fn json(status: u16, body: impl Into<Vec<u8>>) -> Response {
    Response::with(status, "application/json", body)
}

fn route(req: &Request, state: &HealthState) -> Response {
    if !req.is_read() {
        return Response::only_get("application/json", "{}");
    }
    match req.path.as_str() {
        "/healthz" => {
            let ready = state.ready();
            let body = format!(
                "{{\"synced\":{},\"lastUpdated\":{}}}\n",
                ready,
                state.last_ok.load(Ordering::Relaxed)
            );
            json(if ready { 200 } else { 503 }, body)
        }
        "/livez" => json(200, "{\"alive\":true}\n"),
        _ => json(404, "{}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        http::tests::get(addr, "GET", path).await
    }

    #[tokio::test]
    async fn healthz_follows_sync_state() {
        let state = Arc::new(HealthState::default());
        // Port 0 is resolved by bind; find it through a throwaway listener first.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        serve(addr, state.clone()).await.unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503 "));
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));
        state.reconciled(true);
        let ok = get(addr, "/healthz?verbose").await;
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        assert!(ok.contains("\"synced\":true"), "{ok}");
        state.reconciled(false);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503 "));
        // Binding a taken port is an error, not a silent no-op.
        assert!(serve(addr, state).await.is_err());
    }
}
