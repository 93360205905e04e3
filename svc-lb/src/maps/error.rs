//! Errors of reading and writing the LB maps.

use std::{io, path::PathBuf};

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
