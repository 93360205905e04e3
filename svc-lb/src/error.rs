//! The bottom layer: [`chain`], which formats an error's cause chain for logs. Each area keeps
//! its own error enum next to its code (one per area, so callers can match on what went
//! wrong; `main.rs` wraps them in anyhow); the map and interface errors below wait to move to
//! theirs (`maps/`, `netif`).

use std::{error::Error as StdError, io, path::PathBuf};

use thiserror::Error;

/// Reading or writing the LB maps (pinned BPF maps or the in-memory fake).
#[derive(Debug, Error)]
pub enum MapsError {
    /// The pin directory or its service map does not exist: nothing was ever loaded there.
    #[error("no svc-lb maps under {} — is the agent running / was it ever started?", dir.display())]
    PinsMissing { dir: PathBuf },

    /// Some pins exist but this one does not (partial uninstall, or a different svc-lb version).
    #[error("pinned map {} is missing (incomplete svc-lb install? try `svc-lb uninstall`)", path.display())]
    PinMissing { path: PathBuf },

    #[error("cannot open pinned map {}", path.display())]
    Open {
        path: PathBuf,
        /// Boxed: aya's error is large and this travels in every `Result` of the hot path.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// A map operation failed in the kernel (or the key/value size did not match).
    #[error("{op} on {map} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        /// Boxed: aya's error is large and this travels in every `Result` of the hot path.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// `FakeLbMaps` fault injection.
    #[error("injected fault on map operation #{index}")]
    Injected { index: usize },

    #[error("cannot read the number of possible CPUs from {what}")]
    Cpus {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl MapsError {
    /// True when the kernel said "no such element" (ENOENT). Deleting a missing key is a
    /// success for the reconciler, which must be idempotent; classified by errno, never by text.
    pub fn is_not_found(err: &aya::maps::MapError) -> bool {
        use aya::maps::MapError;
        match err {
            MapError::KeyNotFound | MapError::ElementNotFound => true,
            MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
            MapError::IoError(e) => e.raw_os_error() == Some(libc::ENOENT),
            _ => false,
        }
    }
}

/// Looking up interface addresses.
#[derive(Debug, Error)]
pub enum NetifError {
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),

    #[error("getifaddrs failed")]
    Getifaddrs(#[source] io::Error),
}

/// "outer: inner: innermost", for log lines (tracing records one string, not a chain). A
/// source whose text the outer message already ends with (errors that print their source
/// themselves) is not repeated.
pub fn chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("cannot read {what}: {source}")]
    struct PrintsItsSource {
        what: &'static str,
        source: io::Error,
    }

    #[derive(Debug, Error)]
    #[error("sync failed")]
    struct Outer(#[source] PrintsItsSource);

    #[test]
    fn chain_joins_causes_without_repeating_them() {
        let e = Outer(PrintsItsSource {
            what: "dir",
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        });
        assert_eq!(chain(&e), "sync failed: cannot read dir: gone");
        let m = MapsError::Injected { index: 3 };
        assert_eq!(chain(&m), "injected fault on map operation #3");
    }
}
