//! Which `Host` and `Origin` the dashboard answers, against DNS rebinding: a page on
//! `http://evil.example` whose name the attacker re-points at 127.0.0.1 becomes same-origin
//! with the dashboard in the browser's eyes, and could read `/api/state` (every Service,
//! backend and flow counter of the node). The browser still sends `Host: evil.example`, so:
//!
//! - `Host` must name the dashboard: an IP address literal (no DNS involved, so nothing to
//!   rebind; it covers the listen address and tunnels to it), `localhost` (browsers resolve it
//!   to loopback themselves, RFC 6761), or a name given with `--ui-allowed-host`; anything
//!   else gets 403. A request without `Host` (HTTP/1.0 tools) is no browser's and is served.
//! - `Origin`, which browsers send on cross-origin requests, must be the dashboard's own
//!   (`http://` + the `Host` it was sent to) on the API (`/api/...`); the page itself is
//!   static and may be loaded from anywhere.
//!
//! Ports are not compared with the listen port: port forwards (`kubectl port-forward`,
//! `ssh -L`) change them, and a rebinding page cannot choose the `Host` name it sends.

use std::net::IpAddr;

use super::http::Request;

/// The dashboard's allowed names.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Lower case, without a trailing dot.
    names: Vec<String>,
}

impl AllowedHosts {
    /// `names`: the extra names from `--ui-allowed-host` (a node name, a DNS name of the
    /// node), besides address literals and `localhost`.
    pub fn new(names: &[String]) -> Self {
        Self {
            names: names.iter().map(|n| normalize(n)).collect(),
        }
    }

    /// `Err(why)` when the request must be refused with 403.
    pub fn check(&self, req: &Request) -> Result<(), String> {
        let Some(host) = req.host.as_deref() else {
            return Ok(());
        };
        let Some((name, _)) = split_authority(host) else {
            return Err(format!("malformed Host {host:?}"));
        };
        if !self.allows(&name) {
            return Err(format!(
                "Host {host:?} is not this dashboard's (allow it with --ui-allowed-host)"
            ));
        }
        if let Some(origin) = req.origin.as_deref()
            && req.path.starts_with("/api/")
            && !same_origin(origin, host)
        {
            return Err(format!("cross-origin request from {origin:?}"));
        }
        Ok(())
    }

    fn allows(&self, name: &str) -> bool {
        name.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.names.iter().any(|n| n == name)
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` or `[v6][:port]` → (normalized host, port if given); `None` when malformed.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            // A bare IPv6 address is not a valid Host; refuse it rather than guess.
            Some((h, _)) if h.contains(':') => return None,
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse().ok()?),
    };
    Some((normalize(host), port))
}

/// `origin` (`scheme://host[:port]`) is `http://` + the `Host` value `host` (default port 80).
fn same_origin(origin: &str, host: &str) -> bool {
    let Some(authority) = origin.strip_prefix("http://") else {
        // `null` (sandboxed frames, file:// pages), https (the dashboard is plain http).
        return false;
    };
    match (split_authority(authority), split_authority(host)) {
        (Some((oh, op)), Some((hh, hp))) => oh == hh && op.unwrap_or(80) == hp.unwrap_or(80),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use super::*;

    fn req(path: &str, host: Option<&str>, origin: Option<&str>) -> Request {
        Request {
            method: Method::GET,
            path: path.into(),
            host: host.map(Into::into),
            origin: origin.map(Into::into),
        }
    }

    #[test]
    fn hosts_that_cannot_be_rebound_or_were_named() {
        let a = AllowedHosts::new(&["Node-1.example.".into()]);
        for host in [
            "127.0.0.1:9964",
            "10.0.0.5",
            "[::1]:9964",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "node-1.example:9964",
            "NODE-1.EXAMPLE.",
        ] {
            assert_eq!(
                a.check(&req("/api/state", Some(host), None)),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(a.check(&req("/", None, None)), Ok(()));
        for host in [
            "evil.example",
            "evil.example:9964",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "node-2.example",
            "::1",
            "[::1",
            ":9964",
            "localhost:http",
        ] {
            assert!(a.check(&req("/", Some(host), None)).is_err(), "{host}");
        }
    }

    #[test]
    fn the_api_answers_its_own_origin_only() {
        let a = AllowedHosts::default();
        let host = Some("127.0.0.1:9964");
        for (origin, ok) in [
            ("http://127.0.0.1:9964", true),
            ("http://127.0.0.1:9965", false),
            ("http://evil.example", false),
            ("https://127.0.0.1:9964", false),
            ("null", false),
        ] {
            assert_eq!(
                a.check(&req("/api/state", host, Some(origin))).is_ok(),
                ok,
                "{origin}"
            );
        }
        // Default port on both sides.
        assert!(
            a.check(&req(
                "/api/state",
                Some("localhost"),
                Some("http://localhost:80")
            ))
            .is_ok()
        );
        // The page itself may be framed or linked from anywhere; it holds no data.
        assert!(
            a.check(&req("/", host, Some("http://evil.example")))
                .is_ok()
        );
    }
}
