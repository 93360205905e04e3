//! ClusterIP ranges (`--service-cidr`) and the pool of addresses handed out from them, with
//! kube-apiserver's rules (`pkg/registry/core/service/ipallocator`):
//!
//! - the network address is never handed out, nor the broadcast address of an IPv4 range
//!   (IPv6 has no broadcast: its last address is usable);
//! - the first usable address is the `kubernetes` Service's, so no other Service gets it;
//! - dynamic allocation prefers the upper part of the range and falls back to the lower part,
//!   which is kept for addresses users pick themselves (KEP-3070: the lower band is
//!   `min(max(16, size / 16), 256)` addresses);
//! - IPv4 ranges are at most /12 (2^20 addresses, kube-apiserver's limit), IPv6 ones at most
//!   /64 (the current allocator's limit).
//!
//! Where the API server picks a random free address, svc-lb starts from a hash of the
//! Service's name and probes upwards, so that every node given the same manifests computes the
//! same addresses.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use super::ServiceKey;

/// An IP family, as `spec.ipFamilies` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `IPv4` / `IPv6`, the values of `spec.ipFamilies`.
    pub fn api_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn from_api_name(s: &str) -> Option<Family> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The shortest prefix kube-apiserver accepts for a Service range of this family.
    fn min_prefix(self) -> u8 {
        match self {
            Family::V4 => 12,
            Family::V6 => 64,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// One `--service-cidr` range: its network address (host bits cleared) and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceCidr {
    network: IpAddr,
    len: u8,
}

/// kube-apiserver's default `--service-cluster-ip-range`.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

impl Default for ServiceCidr {
    fn default() -> Self {
        DEFAULT_SERVICE_CIDR
            .parse()
            .expect("the default service CIDR parses")
    }
}

impl ServiceCidr {
    pub fn family(&self) -> Family {
        Family::of(self.network)
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Number of addresses the prefix spans, network and broadcast included.
    fn size(&self) -> u128 {
        let host_bits = u32::from(self.family().bits() - self.len);
        // host_bits ≤ 64 (IPv6 prefixes are at least /64), so this never overflows.
        1u128 << host_bits
    }

    fn base(&self) -> u128 {
        to_u128(self.network)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && {
            let ip = to_u128(ip);
            ip >= self.base() && ip - self.base() < self.size()
        }
    }

    /// First and last address handed out at all (the first is the `kubernetes` Service's):
    /// without the network address, and for IPv4 without the broadcast address. None when the
    /// range has no such address (an IPv4 /31 or /32, an IPv6 /128).
    fn usable(&self) -> Option<(u128, u128)> {
        // The prefix's last address; `base + size` itself may not fit (the top IPv6 prefix).
        let end = self.base() + (self.size() - 1);
        let first = self.base().checked_add(1)?;
        let last = match self.family() {
            Family::V4 => end.checked_sub(1)?,
            Family::V6 => end,
        };
        (first <= last).then_some((first, last))
    }

    /// The address kube-apiserver gives the `kubernetes` Service: the first usable one.
    pub fn kubernetes_address(&self) -> Option<IpAddr> {
        self.usable()
            .map(|(first, _)| from_u128(self.family(), first))
    }

    /// The two bands dynamic allocation tries, upper first: `(first, last)` each, the
    /// `kubernetes` address excluded. Empty bands are left out.
    fn dynamic_bands(&self) -> Vec<(u128, u128)> {
        let Some((first, last)) = self.usable() else {
            return Vec::new();
        };
        // KEP-3070's offset, computed on the whole prefix like kube-apiserver's
        // calculateRangeOffset: min(max(16, size/16), 256), 0 for ranges of 16 or fewer.
        let size = self.size();
        let offset = if size <= 16 {
            0
        } else {
            (size / 16).clamp(16, 256)
        };
        let split = first + offset;
        let mut bands = Vec::new();
        let upper_first = split.max(first + 1);
        if upper_first <= last {
            bands.push((upper_first, last));
        }
        let lower_last = split.saturating_sub(1).min(last);
        if offset > 0 && first < lower_last {
            bands.push((first + 1, lower_last));
        }
        bands
    }

    /// Why `ip` (inside this range) can never be given to a Service other than `kubernetes`,
    /// or None if it can.
    pub fn reserved(&self, ip: IpAddr) -> Option<Reserved> {
        let n = to_u128(ip);
        if n == self.base() {
            return Some(Reserved::Network);
        }
        match self.usable() {
            None => Some(Reserved::Broadcast),
            Some((first, _)) if n == first => Some(Reserved::Kubernetes),
            Some((_, last)) if n > last => Some(Reserved::Broadcast),
            Some(_) => None,
        }
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (expected ADDRESS/LENGTH, e.g. 10.96.0.0/12 or fd00:10:96::/108)")]
    Syntax(String),
    #[error("{cidr}: prefix length {len} is longer than {max}")]
    TooLong { cidr: String, len: u8, max: u8 },
    #[error(
        "{cidr}: a Service range must be /{min} or smaller for {family} \
         (kube-apiserver's limit)"
    )]
    TooLarge {
        cidr: String,
        family: Family,
        min: u8,
    },
}

impl FromStr for ServiceCidr {
    type Err = CidrError;

    /// `ADDRESS/LENGTH`; host bits are cleared (like kube-apiserver's sloppy parsing).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (addr, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        let family = Family::of(addr);
        if len > family.bits() {
            return Err(CidrError::TooLong {
                cidr: s.to_owned(),
                len,
                max: family.bits(),
            });
        }
        if len < family.min_prefix() {
            return Err(CidrError::TooLarge {
                cidr: s.to_owned(),
                family,
                min: family.min_prefix(),
            });
        }
        let host_bits = u32::from(family.bits() - len);
        let mask = !((1u128 << host_bits) - 1);
        Ok(ServiceCidr {
            network: from_u128(family, to_u128(addr) & mask),
            len,
        })
    }
}

/// Why an address of a range is never handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    Network,
    Broadcast,
    Kubernetes,
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reserved::Network => "the network address",
            Reserved::Broadcast => "the broadcast address",
            Reserved::Kubernetes => "the first address, reserved for the kubernetes Service",
        })
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        // Callers only pass values inside an IPv4 range.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Where an explicitly requested address stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Free and now the claimant's (or already its own).
    Granted,
    /// Another Service has it.
    Taken(ServiceKey),
    /// Inside `cidr` but never handed out.
    Reserved(ServiceCidr, Reserved),
}

/// The addresses in use, by family; dynamic ones come from the configured ranges.
#[derive(Clone, Debug, Default)]
pub struct IpPool {
    ranges: Vec<ServiceCidr>,
    taken: BTreeMap<IpAddr, ServiceKey>,
}

impl IpPool {
    pub fn new(ranges: &[ServiceCidr]) -> Self {
        IpPool {
            ranges: ranges.to_vec(),
            taken: BTreeMap::new(),
        }
    }

    pub fn ranges(&self) -> &[ServiceCidr] {
        &self.ranges
    }

    /// The range `ip` falls into, if any.
    pub fn range_of(&self, ip: IpAddr) -> Option<ServiceCidr> {
        self.ranges.iter().copied().find(|r| r.contains(ip))
    }

    /// Families that have at least one range, in flag order (the first is the primary).
    pub fn families(&self) -> Vec<Family> {
        let mut out = Vec::new();
        for r in &self.ranges {
            if !out.contains(&r.family()) {
                out.push(r.family());
            }
        }
        out
    }

    /// Takes `ip` for `who` whatever range it is in (an address kept from the record: it
    /// stays where it is even if the ranges changed, as kube-apiserver leaves existing
    /// Services alone when its range changes). Fails only if someone else has it.
    pub fn keep(&mut self, ip: IpAddr, who: &ServiceKey) -> Result<(), ServiceKey> {
        match self.taken.get(&ip) {
            Some(owner) if owner != who => Err(owner.clone()),
            _ => {
                self.taken.insert(ip, who.clone());
                Ok(())
            }
        }
    }

    /// An address the Service asks for in `spec.clusterIP(s)`. Addresses outside every range
    /// are granted as given (see the module docs of `alloc`), but still only to one Service.
    pub fn claim(&mut self, ip: IpAddr, who: &ServiceKey, is_kubernetes: bool) -> Claim {
        if let Some(owner) = self.taken.get(&ip) {
            if owner != who {
                return Claim::Taken(owner.clone());
            }
            return Claim::Granted;
        }
        if let Some(range) = self.range_of(ip) {
            match range.reserved(ip) {
                Some(Reserved::Kubernetes) if is_kubernetes => {}
                Some(why) => return Claim::Reserved(range, why),
                None => {}
            }
        }
        self.taken.insert(ip, who.clone());
        Claim::Granted
    }

    /// A free address of `family` for `who`: from the first range of that family with room,
    /// starting at `seed` within its upper band, then its lower band. None when every range of
    /// the family is full.
    pub fn allocate(&mut self, family: Family, seed: u64, who: &ServiceKey) -> Option<IpAddr> {
        let ranges: Vec<ServiceCidr> = self
            .ranges
            .iter()
            .copied()
            .filter(|r| r.family() == family)
            .collect();
        for range in ranges {
            for (lo, hi) in range.dynamic_bands() {
                if let Some(n) = self.probe(family, lo, hi, seed) {
                    let ip = from_u128(family, n);
                    self.taken.insert(ip, who.clone());
                    return Some(ip);
                }
            }
        }
        None
    }

    /// The first free address at or after `lo + seed % size`, wrapping within `lo..=hi`.
    /// Costs the length of the run of taken addresses it starts in (a full band: every taken
    /// address of the band), never the size of the band, which is up to 2^64 for IPv6.
    fn probe(&self, family: Family, lo: u128, hi: u128, seed: u64) -> Option<u128> {
        let size = hi - lo + 1;
        let start = lo + u128::from(seed) % size;
        self.first_free(family, start, hi).or_else(|| {
            (start > lo)
                .then(|| self.first_free(family, lo, start - 1))
                .flatten()
        })
    }

    /// The lowest free address in `from..=to`.
    fn first_free(&self, family: Family, from: u128, to: u128) -> Option<u128> {
        let mut next = from;
        let taken = self
            .taken
            .range(from_u128(family, from)..=from_u128(family, to))
            .map(|(ip, _)| to_u128(*ip));
        for ip in taken {
            if ip != next {
                return Some(next);
            }
            // The last address of the IPv6 space taken: nothing after it.
            next = next.checked_add(1)?;
        }
        (next <= to).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> ServiceCidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    #[test]
    fn parsing_clears_host_bits_and_enforces_kube_apiserver_limits() {
        assert_eq!(cidr("10.96.0.1/12").to_string(), "10.96.0.0/12");
        assert_eq!(cidr("fd00::1:2/120").to_string(), "fd00::1:0/120");
        assert_eq!(ServiceCidr::default().to_string(), "10.96.0.0/12");
        assert!(matches!(
            "10.0.0.0/8".parse::<ServiceCidr>(),
            Err(CidrError::TooLarge { min: 12, .. })
        ));
        assert!(matches!(
            "fd00::/48".parse::<ServiceCidr>(),
            Err(CidrError::TooLarge { min: 64, .. })
        ));
        assert!("fd00::/64".parse::<ServiceCidr>().is_ok());
        assert!(matches!(
            "10.0.0.0/33".parse::<ServiceCidr>(),
            Err(CidrError::TooLong { .. })
        ));
        for bad in ["10.0.0.0", "10.0.0/24", "x/24", "10.0.0.0/", "10.0.0.0/-1"] {
            assert!(
                matches!(bad.parse::<ServiceCidr>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reserved_addresses_follow_the_api_server() {
        let r = cidr("10.96.0.0/12");
        assert_eq!(r.reserved(ip("10.96.0.0")), Some(Reserved::Network));
        assert_eq!(r.reserved(ip("10.96.0.1")), Some(Reserved::Kubernetes));
        assert_eq!(r.reserved(ip("10.111.255.255")), Some(Reserved::Broadcast));
        assert_eq!(r.reserved(ip("10.111.255.254")), None);
        assert_eq!(r.kubernetes_address(), Some(ip("10.96.0.1")));
        // IPv6: no broadcast, the last address is usable.
        let r6 = cidr("fd00::/120");
        assert_eq!(r6.reserved(ip("fd00::")), Some(Reserved::Network));
        assert_eq!(r6.reserved(ip("fd00::1")), Some(Reserved::Kubernetes));
        assert_eq!(r6.reserved(ip("fd00::ff")), None);
    }

    #[test]
    fn tiny_ranges() {
        // /30: .1 is the kubernetes Service's, .2 the only dynamic address, .3 broadcast.
        let r = cidr("10.0.0.0/30");
        assert_eq!(
            r.dynamic_bands(),
            vec![(to_u128(ip("10.0.0.2")), to_u128(ip("10.0.0.2")))]
        );
        let mut pool = IpPool::new(&[r]);
        assert_eq!(
            pool.allocate(Family::V4, 12345, &key("a")),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(pool.allocate(Family::V4, 1, &key("b")), None);
        // /31 and /32 have nothing to hand out (kube-apiserver: size 0, always full).
        for s in ["10.0.0.0/31", "10.0.0.7/32"] {
            let r = cidr(s);
            assert!(r.dynamic_bands().is_empty(), "{s}");
            assert_eq!(r.kubernetes_address(), None, "{s}");
            let mut pool = IpPool::new(&[r]);
            assert_eq!(pool.allocate(Family::V4, 0, &key("a")), None, "{s}");
            assert!(matches!(
                pool.claim(r.network(), &key("a"), false),
                Claim::Reserved(_, Reserved::Network)
            ));
        }
        assert!(matches!(
            IpPool::new(&[cidr("10.0.0.0/31")]).claim(ip("10.0.0.1"), &key("a"), false),
            Claim::Reserved(_, Reserved::Broadcast)
        ));
        // IPv6 /127: network + one address, the kubernetes Service's. /128: nothing.
        let r = cidr("fd00::/127");
        assert!(r.dynamic_bands().is_empty());
        assert_eq!(r.kubernetes_address(), Some(ip("fd00::1")));
        assert_eq!(cidr("fd00::5/128").kubernetes_address(), None);
    }

    #[test]
    fn bands_split_like_kep_3070() {
        // /24: size 256 → offset 16: upper band .17-.254, lower band .2-.16.
        let r = cidr("10.0.0.0/24");
        let n = |s: &str| to_u128(ip(s));
        assert_eq!(
            r.dynamic_bands(),
            vec![
                (n("10.0.0.17"), n("10.0.0.254")),
                (n("10.0.0.2"), n("10.0.0.16"))
            ]
        );
        // /12: offset capped at 256.
        let r = cidr("10.96.0.0/12");
        assert_eq!(r.dynamic_bands()[0].0, n("10.96.1.1"));
        // /28 (16 addresses): no lower band.
        let r = cidr("10.0.0.0/28");
        assert_eq!(r.dynamic_bands(), vec![(n("10.0.0.2"), n("10.0.0.14"))]);
        // IPv6 /120: 256 addresses, last one usable.
        let r = cidr("fd00::/120");
        let n6 = |s: &str| to_u128(ip(s));
        assert_eq!(
            r.dynamic_bands(),
            vec![
                (n6("fd00::11"), n6("fd00::ff")),
                (n6("fd00::2"), n6("fd00::10"))
            ]
        );
    }

    #[test]
    fn upper_band_first_then_lower_then_exhausted() {
        let r = cidr("10.0.0.0/24");
        let mut pool = IpPool::new(&[r]);
        let mut got = Vec::new();
        for i in 0..253 {
            let a = pool
                .allocate(Family::V4, 7, &key(&format!("s{i}")))
                .unwrap_or_else(|| panic!("allocation {i} failed"));
            got.push(a);
        }
        // The first 238 come from .17-.254, then .2-.16; never .0, .1 or .255.
        assert!(
            got[..238]
                .iter()
                .all(|a| to_u128(*a) >= to_u128(ip("10.0.0.17")))
        );
        assert!(
            got[238..]
                .iter()
                .all(|a| to_u128(*a) <= to_u128(ip("10.0.0.16")))
        );
        assert!(!got.contains(&ip("10.0.0.0")));
        assert!(!got.contains(&ip("10.0.0.1")));
        assert!(!got.contains(&ip("10.0.0.255")));
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 253);
        assert_eq!(pool.allocate(Family::V4, 7, &key("full")), None);
    }

    #[test]
    fn second_range_of_a_family_takes_over_when_the_first_is_full() {
        let mut pool = IpPool::new(&[cidr("10.0.0.0/30"), cidr("10.1.0.0/30")]);
        assert_eq!(
            pool.allocate(Family::V4, 0, &key("a")),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            pool.allocate(Family::V4, 0, &key("b")),
            Some(ip("10.1.0.2"))
        );
        assert_eq!(pool.allocate(Family::V4, 0, &key("c")), None);
        assert_eq!(pool.allocate(Family::V6, 0, &key("d")), None);
        assert_eq!(pool.families(), vec![Family::V4]);
    }

    #[test]
    fn ipv6_ranges_allocate_with_u128_arithmetic() {
        let mut pool = IpPool::new(&[cidr("10.96.0.0/12"), cidr("fd00:10:96::/64")]);
        assert_eq!(pool.families(), vec![Family::V4, Family::V6]);
        let a = pool.allocate(Family::V6, u64::MAX, &key("a")).unwrap();
        assert!(cidr("fd00:10:96::/64").contains(a));
        assert_eq!(cidr("fd00:10:96::/64").reserved(a), None);
        let b = pool.allocate(Family::V6, u64::MAX, &key("b")).unwrap();
        assert_ne!(a, b, "probing moves past a taken address");
    }

    #[test]
    fn probing_wraps_and_survives_the_end_of_the_ipv6_space() {
        let r = cidr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120");
        let mut pool = IpPool::new(&[r]);
        let last = ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(pool.claim(last, &key("a"), false), Claim::Granted);
        // The upper band is ..ff11-..ffff; starting at its end (taken), probing wraps.
        let (lo, hi) = r.dynamic_bands()[0];
        let seed = u64::try_from(hi - lo).unwrap();
        assert_eq!(
            pool.allocate(Family::V6, seed, &key("b")),
            Some(from_u128(Family::V6, lo))
        );
    }

    #[test]
    fn claims() {
        let mut pool = IpPool::new(&[cidr("10.96.0.0/12")]);
        assert_eq!(
            pool.claim(ip("10.96.0.10"), &key("a"), false),
            Claim::Granted
        );
        assert_eq!(
            pool.claim(ip("10.96.0.10"), &key("a"), false),
            Claim::Granted
        );
        assert_eq!(
            pool.claim(ip("10.96.0.10"), &key("b"), false),
            Claim::Taken(key("a"))
        );
        assert!(matches!(
            pool.claim(ip("10.96.0.1"), &key("b"), false),
            Claim::Reserved(_, Reserved::Kubernetes)
        ));
        assert_eq!(
            pool.claim(
                ip("10.96.0.1"),
                &ServiceKey::new("default", "kubernetes"),
                true
            ),
            Claim::Granted
        );
        // Outside every range: granted as given, but still exclusive.
        assert_eq!(
            pool.claim(ip("172.20.0.10"), &key("c"), false),
            Claim::Granted
        );
        assert_eq!(
            pool.claim(ip("172.20.0.10"), &key("d"), false),
            Claim::Taken(key("c"))
        );
        // Dynamic allocation never lands on a claimed address.
        let mut pool = IpPool::new(&[cidr("10.0.0.0/30")]);
        assert_eq!(pool.claim(ip("10.0.0.2"), &key("a"), false), Claim::Granted);
        assert_eq!(pool.allocate(Family::V4, 0, &key("b")), None);
        assert_eq!(pool.keep(ip("10.0.0.2"), &key("b")), Err(key("a")));
        assert_eq!(pool.keep(ip("192.0.2.1"), &key("b")), Ok(()));
    }
}
