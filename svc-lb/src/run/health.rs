//! A tiny local HTTP health endpoint for API mode (kubelet probes, like kube-proxy's healthz):
//!
//! - `/healthz`: 200 once the maps were programmed from a complete list and the last reconcile
//!   succeeded, 503 before (readiness);
//! - `/livez`: 200 while the agent's event loop runs (liveness).
//!
//! Served on a tokio listener with the request reading and response writing of `views::http`:
//! two fixed GET routes do not justify an HTTP server crate.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::views::http::{self, Response};

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
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(conn, &state)).await;
            });
        }
    });
    Ok(())
}

async fn answer(mut conn: TcpStream, state: &HealthState) -> std::io::Result<()> {
    let (method, path) = http::read_request(&mut conn, 8192).await?;
    let (status, body) = route(&method, &path, state);
    debug!(method, path, status, "health request");
    let response = Response {
        status,
        content_type: "application/json",
        body: body.into_bytes(),
    };
    http::write_response(&mut conn, &response, method == "HEAD").await
}

fn route(method: &str, path: &str, state: &HealthState) -> (u16, String) {
    if method != "GET" && method != "HEAD" {
        return (405, "{}".into());
    }
    match path {
        "/healthz" => {
            let ready = state.ready();
            let body = format!(
                "{{\"synced\":{},\"lastUpdated\":{}}}\n",
                ready,
                state.last_ok.load(Ordering::Relaxed)
            );
            (if ready { 200 } else { 503 }, body)
        }
        "/livez" => (200, "{\"alive\":true}\n".into()),
        _ => (404, "{}".into()),
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
