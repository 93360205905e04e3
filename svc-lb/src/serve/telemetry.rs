//! What the agent loop knows and the views show: sync durations, the objects it skipped and
//! why, and the last objects it read (for the DNS responder). Written by the loop after each
//! sync, read by the servers.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{k8s::manifest::Objects, translate::Rejected};

/// Upper bounds (seconds) of the sync latency histogram buckets; `+Inf` is implied.
pub const SYNC_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A Prometheus-style cumulative histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations `<=` each of [`SYNC_BUCKETS`] (not cumulative; summed when rendered).
    pub buckets: [u64; SYNC_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = SYNC_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += s;
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub sync_latency: Histogram,
    pub syncs_ok: u64,
    pub syncs_failed: u64,
    /// Unix seconds of the last successful sync (0 = never).
    pub last_sync_unix: u64,
    /// From the last translation.
    pub rejected: Vec<Rejected>,
    /// The objects of the last read (Services and EndpointSlices feed DNS).
    pub objects: Arc<Objects>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Telemetry(Arc<Mutex<State>>);

impl Telemetry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the plain data inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reconcile finished (`ok` = the maps were programmed).
    pub fn record_sync(&self, took: Duration, ok: bool) {
        let mut s = self.lock();
        s.sync_latency.observe(took);
        if ok {
            s.syncs_ok += 1;
            s.last_sync_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        } else {
            s.syncs_failed += 1;
        }
    }

    /// A new read of the objects and what translating them skipped.
    pub fn record_objects(&self, objects: &Objects, rejected: &[Rejected]) {
        let mut s = self.lock();
        s.objects = Arc::new(objects.clone());
        s.rejected = rejected.to_vec();
    }

    pub fn objects(&self) -> Arc<Objects> {
        self.lock().objects.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(3));
        assert_eq!(h.buckets, [2, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(h.count, 4);
        assert!((h.sum_seconds - 3.0315).abs() < 1e-9);
    }
}
