//! The node ports in use (`--nodeport-range`), with kube-apiserver's rules
//! (`pkg/registry/core/service/portallocator`):
//!
//! - one number space for every protocol: a node port belongs to one Service, whatever the
//!   protocol (inside one Service, ports with the same `port` share their node port, e.g.
//!   53/TCP and 53/UDP);
//! - `healthCheckNodePort` comes from the same space;
//! - dynamic allocation prefers the upper part of the range and falls back to the lower part,
//!   kept for ports users pick themselves (KEP-3668: the lower band is
//!   `min(max(16, size / 32), 128)` ports).
//!
//! Like the ClusterIP pool, the search starts at a hash of the Service (and port) instead of a
//! random number, so every node computes the same ports from the same manifests.

use std::{collections::BTreeMap, ops::RangeInclusive};

use super::ServiceKey;

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: RangeInclusive<u16> = 30000..=32767;

/// Where an explicitly requested node port stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortClaim {
    /// Free and now the claimant's (or already its own).
    Granted,
    /// Another Service has it.
    Taken(ServiceKey),
    /// Outside `--nodeport-range`.
    OutOfRange,
}

#[derive(Clone, Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    taken: BTreeMap<u16, ServiceKey>,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        PortPool {
            range,
            taken: BTreeMap::new(),
        }
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    #[cfg(test)]
    pub fn owner(&self, port: u16) -> Option<&ServiceKey> {
        self.taken.get(&port)
    }

    /// A port the Service asks for (`nodePort`, `healthCheckNodePort`) or kept from the
    /// record.
    pub fn claim(&mut self, port: u16, who: &ServiceKey) -> PortClaim {
        if !self.range.contains(&port) {
            return PortClaim::OutOfRange;
        }
        match self.taken.get(&port) {
            Some(owner) if owner != who => PortClaim::Taken(owner.clone()),
            _ => {
                self.taken.insert(port, who.clone());
                PortClaim::Granted
            }
        }
    }

    /// The bands dynamic allocation tries, upper first, as `(first, last)`.
    fn bands(&self) -> Vec<(u16, u16)> {
        let (min, max) = (*self.range.start(), *self.range.end());
        if min > max {
            return Vec::new();
        }
        let size = u32::from(max) - u32::from(min) + 1;
        // kube-apiserver's calculateRangeOffset for ports.
        let offset = if size <= 16 {
            0
        } else {
            (size / 32).clamp(16, 128)
        };
        // offset < size, so min + offset ≤ max.
        let split = (u32::from(min) + offset) as u16;
        let mut bands = vec![(split, max)];
        if offset > 0 {
            bands.push((min, split - 1));
        }
        bands
    }

    /// A free port for `who`, starting at `seed` within the upper band, then the lower band.
    /// None when the range is full.
    pub fn allocate(&mut self, seed: u64, who: &ServiceKey) -> Option<u16> {
        for (lo, hi) in self.bands() {
            let size = u64::from(hi - lo) + 1;
            let used = self.taken.range(lo..=hi).count() as u64;
            if used >= size {
                continue;
            }
            let start = lo + (seed % size) as u16;
            let mut p = start;
            loop {
                if let std::collections::btree_map::Entry::Vacant(e) = self.taken.entry(p) {
                    e.insert(who.clone());
                    return Some(p);
                }
                p = if p == hi { lo } else { p + 1 };
                if p == start {
                    break;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    #[test]
    fn bands_follow_kep_3668() {
        // Default range: 2768 ports → offset 86: upper 30086-32767, lower 30000-30085.
        let pool = PortPool::new(DEFAULT_NODE_PORTS);
        assert_eq!(pool.bands(), vec![(30086, 32767), (30000, 30085)]);
        // Small ranges: offset at least 16; 16 ports or fewer: no lower band.
        assert_eq!(
            PortPool::new(30000..=30099).bands(),
            vec![(30016, 30099), (30000, 30015)]
        );
        assert_eq!(PortPool::new(30000..=30015).bands(), vec![(30000, 30015)]);
        assert_eq!(PortPool::new(30000..=30000).bands(), vec![(30000, 30000)]);
        // Large ranges: capped at 128.
        assert_eq!(PortPool::new(1..=65535).bands()[0], (129, 65535));
    }

    #[test]
    fn upper_band_first_then_lower_then_exhausted() {
        let mut pool = PortPool::new(30000..=30099);
        let mut got: Vec<u16> = (0..100)
            .map(|i| pool.allocate(i * 7919, &key(&format!("s{i}"))).unwrap())
            .collect();
        assert!(got[..84].iter().all(|p| *p >= 30016));
        assert!(got[84..].iter().all(|p| *p < 30016));
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 100);
        assert_eq!(pool.allocate(0, &key("full")), None);
    }

    #[test]
    fn single_port_range_and_range_edges() {
        let mut pool = PortPool::new(32767..=32767);
        assert_eq!(pool.claim(32766, &key("a")), PortClaim::OutOfRange);
        assert_eq!(pool.allocate(u64::MAX, &key("a")), Some(32767));
        assert_eq!(pool.allocate(0, &key("b")), None);
        let mut pool = PortPool::new(DEFAULT_NODE_PORTS);
        assert_eq!(pool.claim(29999, &key("a")), PortClaim::OutOfRange);
        assert_eq!(pool.claim(32768, &key("a")), PortClaim::OutOfRange);
        assert_eq!(pool.claim(30000, &key("a")), PortClaim::Granted);
        assert_eq!(pool.claim(32767, &key("a")), PortClaim::Granted);
    }

    #[test]
    fn claims_are_exclusive_and_dynamic_allocation_avoids_them() {
        let mut pool = PortPool::new(30000..=30001);
        assert_eq!(pool.claim(30001, &key("a")), PortClaim::Granted);
        assert_eq!(pool.claim(30001, &key("a")), PortClaim::Granted);
        assert_eq!(pool.claim(30001, &key("b")), PortClaim::Taken(key("a")));
        assert_eq!(pool.owner(30001), Some(&key("a")));
        assert_eq!(pool.allocate(1, &key("b")), Some(30000));
        assert_eq!(pool.allocate(1, &key("c")), None);
    }
}
