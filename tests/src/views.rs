//! Helpers for the views tests (metrics, DNS, dashboard): plain HTTP GETs of a path from
//! inside a namespace.

use std::{
    io::{self, Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use crate::{client, netns::Netns};

/// `GET path` over a new connection from inside `ns`; returns the status code and the body.
pub fn http_get_path(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = client::connect(ns, addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of headers in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// The value of the first sample of `metric` whose line contains every one of `labels`
/// (Prometheus text format), if any.
pub fn sample(exposition: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
