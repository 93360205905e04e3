//! A minimal local HTTP/1.1 server for the views (`/metrics`, the dashboard and its JSON):
//! GET/HEAD only, one request per connection, the handler runs on the blocking pool because it
//! reads BPF maps with syscalls. Like `run/health.rs`, a handful of fixed routes does not
//! justify an HTTP server crate.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

/// Maps a path (without the query string) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Binds `addr` (so a taken port is a startup error) and serves in background tasks.
/// Returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, handler: Handler) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, handler)).await;
            });
        }
    });
    Ok(bound)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Reads the request head (up to `limit` bytes, so a client cannot make us buffer without
/// bound) and returns its method and path (without the query string).
pub(crate) async fn read_request(
    conn: &mut TcpStream,
    limit: usize,
) -> std::io::Result<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < limit {
        let room = chunk.len().min(limit - buf.len());
        let n = conn.read(&mut chunk[..room]).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    Ok((method.to_owned(), path.to_owned()))
}

/// Writes `response` (headers only for HEAD) and closes the connection.
pub(crate) async fn write_response(
    conn: &mut TcpStream,
    response: &Response,
    head: bool,
) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    conn.write_all(header.as_bytes()).await?;
    if !head {
        conn.write_all(&response.body).await?;
    }
    conn.shutdown().await
}

async fn answer(mut conn: TcpStream, handler: Handler) -> std::io::Result<()> {
    let (method, path) = read_request(&mut conn, 16384).await?;
    let head = method == "HEAD";
    let response = if method != "GET" && !head {
        Response::text(405, "GET only\n")
    } else {
        let p = path.clone();
        tokio::task::spawn_blocking(move || handler(&p))
            .await
            .unwrap_or_else(|_| Response::text(500, "handler panicked\n"))
    };
    debug!(method, path, status = response.status, "views request");
    write_response(&mut conn, &response, head).await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// GET `path` and return the whole response (status line, headers, body).
    pub async fn get(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_methods_and_head() {
        let handler: Handler = Arc::new(|path: &str| match path {
            "/a" => Response::ok("text/plain", "hello"),
            _ => Response::text(404, "no\n"),
        });
        let addr = serve("127.0.0.1:0".parse().unwrap(), handler)
            .await
            .unwrap();
        let a = get(addr, "GET", "/a?x=1").await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("Content-Length: 5\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nhello"), "{a}");
        let head = get(addr, "HEAD", "/a").await;
        assert!(
            head.ends_with(
                "Content-Length: 5\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
            ),
            "{head}"
        );
        assert!(get(addr, "GET", "/b").await.starts_with("HTTP/1.1 404 "));
        assert!(get(addr, "POST", "/a").await.starts_with("HTTP/1.1 405 "));
        // A taken port is an error.
        let handler: Handler = Arc::new(|_: &str| Response::text(200, ""));
        assert!(serve(addr, handler).await.is_err());
    }
}
