//! The one HTTP/1.1 server of the agent: Prometheus metrics, the dashboard and its JSON, the
//! agent's `/healthz` + `/livez` and every healthCheckNodePort server run on [`spawn`]'s accept
//! loop, with hyper 1.x (already in the tree through kube) doing the protocol: keep-alive,
//! pipelining, chunked or oversized requests, HEAD without a body, header size limits.
//!
//! Each server passes a [`Handler`] (request → response) and its [`Limits`]. Handlers that
//! read BPF maps (syscalls) run on the blocking pool; the health handlers answer from atomics
//! in place.

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::debug;

/// What a handler sees of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Without the query string.
    pub path: String,
    /// The `Host` header (absent with HTTP/1.0 clients that do not send one).
    pub host: Option<String>,
    /// The `Origin` header: browsers send it on cross-origin requests.
    pub origin: Option<String>,
}

impl Request {
    /// GET or HEAD: the only methods of the read-only servers.
    pub fn is_read(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Further headers (`Content-Type` and `Content-Length` are always written).
    pub headers: Vec<(&'static str, &'static str)>,
}

/// The views change at every scrape or poll: nothing may be cached.
const NO_STORE: (&str, &str) = ("cache-control", "no-store");

impl Response {
    /// 200 with `body`, not cacheable.
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self::with(200, content_type, body)
    }

    /// `status` with a plain-text body, not cacheable.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::with(status, "text/plain; charset=utf-8", body.into())
    }

    /// `status` with `body` of `content_type`, not cacheable.
    pub fn with(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            headers: vec![NO_STORE],
        }
    }

    /// 405 for a method other than GET and HEAD, with the `Allow` header RFC 9110 asks for.
    pub fn only_get(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        let mut r = Self::with(405, content_type, body);
        r.headers.push(("allow", "GET, HEAD"));
        r
    }
}

/// Answers one request.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// How one server treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Run the handler on the blocking pool (it makes syscalls, e.g. reads BPF maps).
    pub blocking: bool,
    /// Longest wait for a whole request head, and for the next one on an idle keep-alive
    /// connection (hyper's header read timeout): a client that trickles bytes (slowloris)
    /// or holds a connection open without using it is cut off after this.
    pub head_timeout: Duration,
    /// Largest request head (hyper's read buffer): larger ones get 431, so a client cannot
    /// make the agent buffer without bound.
    pub max_head: usize,
    /// Longest life of one connection: then it is closed after its current response (a
    /// client that keeps reusing a connection cannot keep it forever) and dropped if that
    /// response is not taken within `head_timeout` (a client that stops reading).
    pub max_lifetime: Duration,
}

impl Limits {
    /// Metrics and the dashboard: answers built from the maps at request time.
    pub const VIEWS: Limits = Limits {
        blocking: true,
        head_timeout: Duration::from_secs(10),
        max_head: 16 * 1024,
        max_lifetime: Duration::from_secs(120),
    };

    /// Health endpoints (agent and healthCheckNodePort): answered from atomics. Shorter
    /// timeouts, like kubelet's and cloud load balancers' probe timeouts.
    pub const HEALTH: Limits = Limits {
        blocking: false,
        head_timeout: Duration::from_secs(5),
        max_head: 8 * 1024,
        max_lifetime: Duration::from_secs(60),
    };
}

/// Binds `addr` (so a taken port is a startup error) and serves it with `handler` in
/// background tasks. Returns the bound address (useful with port 0) and the accept loop's
/// task (aborting it closes the port; connections already accepted finish on their own).
pub async fn serve(
    addr: SocketAddr,
    handler: Handler,
    limits: Limits,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, spawn(listener, handler, limits)))
}

/// Binds `addr` now, without awaiting (for callers that are not async but run inside a
/// runtime): errors come back to the caller instead of getting lost in a task.
pub fn bind_now(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// The accept loop: one task per connection, hyper speaks HTTP/1.1 on it.
pub fn spawn(listener: TcpListener, handler: Handler, limits: Limits) -> JoinHandle<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head)
        // `Content-Length`, not `content-length`: what the hand-written servers sent, and
        // what naive clients (and scripts grepping the response) expect.
        .title_case_headers(true)
        .keep_alive(true);
    tokio::spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(&req, handler, limits).await) }
            });
            let conn = http.serve_connection(TokioIo::new(conn), service);
            tokio::spawn(async move {
                let mut conn = pin!(conn);
                // At most `max_lifetime`, then closed after the response in flight, and
                // dropped if that response is not taken within `head_timeout`.
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = tokio::time::sleep(limits.max_lifetime) => {
                        conn.as_mut().graceful_shutdown();
                        match tokio::time::timeout(limits.head_timeout, conn.as_mut()).await {
                            Ok(r) => r,
                            Err(_) => {
                                debug!(%peer, "connection dropped: its last response was not taken");
                                return;
                            }
                        }
                    }
                };
                if let Err(e) = result {
                    debug!(%peer, "connection ended: {e}");
                }
            });
        }
    })
}

fn header(req: &hyper::Request<Incoming>, name: HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn answer(
    req: &hyper::Request<Incoming>,
    handler: Handler,
    limits: Limits,
) -> hyper::Response<Full<Bytes>> {
    let request = Request {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        host: header(req, header::HOST),
        origin: header(req, header::ORIGIN),
    };
    let response = if limits.blocking {
        let r = request.clone();
        tokio::task::spawn_blocking(move || handler(&r))
            .await
            .unwrap_or_else(|_| Response::text(500, "handler panicked\n"))
    } else {
        handler(&request)
    };
    debug!(
        method = %request.method,
        path = request.path,
        status = response.status,
        "http request"
    );
    to_hyper(response)
}

/// hyper leaves out the body of an answer to HEAD and keeps the `Content-Length` it would
/// have had (RFC 9110 9.3.2).
fn to_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    for (name, value) in r.headers {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;

    /// `method path` on a new connection (`Connection: close`); the whole response (status
    /// line, headers, body).
    pub async fn get(addr: SocketAddr, method: &str, path: &str) -> String {
        raw(
            addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    /// Writes `request` as is and reads until the server closes.
    pub async fn raw(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn server() -> SocketAddr {
        server_with(Limits::VIEWS).await
    }

    async fn server_with(limits: Limits) -> SocketAddr {
        let handler: Handler = Arc::new(|req: &Request| match req.path.as_str() {
            _ if !req.is_read() => Response::only_get("text/plain", "GET only\n"),
            "/a" => Response::ok("text/plain", "hello"),
            "/host" => Response::ok("text/plain", req.host.clone().unwrap_or_default()),
            _ => Response::text(404, "no\n"),
        });
        let (addr, _) = serve("127.0.0.1:0".parse().unwrap(), handler, limits)
            .await
            .unwrap();
        addr
    }

    #[tokio::test]
    async fn routes_methods_and_head() {
        let addr = server().await;
        let a = get(addr, "GET", "/a?x=1").await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("\r\nContent-Length: 5\r\n"), "{a}");
        assert!(a.contains("\r\nCache-Control: no-store\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nhello"), "{a}");
        // HEAD: the same headers, no body.
        let head = get(addr, "HEAD", "/a").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 5\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, "GET", "/b").await.starts_with("HTTP/1.1 404 "));
        let post = get(addr, "POST", "/a").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
        // A taken port is an error.
        let handler: Handler = Arc::new(|_: &Request| Response::text(200, ""));
        assert!(serve(addr, handler, Limits::VIEWS).await.is_err());
    }

    /// Keep-alive and pipelining: three requests written at once on one connection get three
    /// answers in order; the last asks to close.
    #[tokio::test]
    async fn keep_alive_and_pipelining() {
        let addr = server().await;
        let out = raw(
            addr,
            "GET /a HTTP/1.1\r\nHost: one\r\n\r\n\
             GET /host HTTP/1.1\r\nHost: two\r\n\r\n\
             GET /nope HTTP/1.1\r\nHost: three\r\nConnection: close\r\n\r\n",
        )
        .await;
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["200", "200", "404"], "{out}");
        assert!(out.contains("\r\n\r\nhelloHTTP/1.1 200"), "{out}");
        assert!(out.contains("\r\n\r\ntwoHTTP/1.1 404"), "{out}");
    }

    /// A request head larger than the limit is refused (431) instead of being buffered.
    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let addr = server().await;
        let big = "x".repeat(Limits::VIEWS.max_head + 1);
        let out = raw(
            addr,
            &format!("GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    /// A client that opens a connection and sends nothing (or trickles a head) is cut off
    /// after the head timeout instead of holding a task forever.
    #[tokio::test]
    async fn idle_connections_are_closed() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::VIEWS
        };
        let addr = server_with(limits).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            limits.head_timeout + Duration::from_secs(2),
            c.read_to_end(&mut out),
        )
        .await;
        assert!(read.is_ok(), "still open after the head timeout");
    }
}
