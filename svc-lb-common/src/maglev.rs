//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium uses it: every backend
//! gets a pseudo-random permutation of the `M` table positions (from its address, so every
//! node computes the same table), and backends take turns claiming their next free preferred
//! position until the table is full. A flow's hash indexes the table. When one of N backends
//! goes away only about 1/N of the positions change owner, so most flows keep their backend
//! even without conntrack (another node, a restarted node, an evicted entry).
//!
//! Allocation-free so it stays `no_std`: the caller passes the table and a scratch buffer.

/// Positions in a datapath table. Prime (required for the permutations to cover every
/// position) and far larger than typical backend counts (Maglev wants M >> N); Cilium's default.
pub const MAGLEV_TABLE_SIZE: usize = 16_381;

/// splitmix64 finalizer: a cheap, well-mixed 64-bit hash step.
#[inline(always)]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (offset, skip) of a backend's permutation of `m` positions, from its address and port in
/// network order (the map layout), so the table does not depend on backend ids.
pub fn permutation(addr: u32, port: u16, m: usize) -> (usize, usize) {
    let m = m as u64;
    let ident = (u64::from(addr) << 16) | u64::from(port);
    let offset = mix64(ident ^ 0x6d61_676c_6576_0001) % m;
    let skip = mix64(ident ^ 0x6d61_676c_6576_0002) % (m - 1) + 1;
    (offset as usize, skip as usize)
}

/// Why a table cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// No backends, or more backends than positions.
    BadBackendCount,
    /// `table` and `next` do not match `perms`.
    BadBuffers,
}

/// Fills `table` (length M, prime) with indexes into `perms` (one (offset, skip) per backend,
/// from [`permutation`]). `next` is scratch space, one per backend. Backends listed in a
/// different order get the same positions except where two permutations collide, so callers
/// should pass them in a stable order (e.g. sorted by address).
pub fn populate(
    perms: &[(usize, usize)],
    table: &mut [u32],
    next: &mut [usize],
) -> Result<(), MaglevError> {
    let m = table.len();
    let n = perms.len();
    if n == 0 || n > m {
        return Err(MaglevError::BadBackendCount);
    }
    if next.len() != n {
        return Err(MaglevError::BadBuffers);
    }
    const EMPTY: u32 = u32::MAX;
    table.fill(EMPTY);
    next.fill(0);
    let mut filled = 0;
    loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            // Next position in backend i's preference list that is still free. Terminates:
            // the permutation visits every position (skip < m, m prime) and one is free.
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != EMPTY {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return Ok(());
            }
        }
    }
}

/// Hash of a flow's addresses, ports and protocol (network order, as in the packet) to pick a
/// table position; identical on every node, so a flow maps to the same backend anywhere.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let a = (u64::from(saddr) << 32) | u64::from(daddr);
    let b = (u64::from(sport) << 32) | (u64::from(dport) << 8) | u64::from(proto);
    let h = mix64(mix64(a) ^ b);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = 251;

    fn perms(n: u32) -> [(usize, usize); 16] {
        let mut p = [(0, 0); 16];
        for i in 0..n {
            p[i as usize] = permutation(0x0a00_0000 + i, 8080, M);
        }
        p
    }

    fn table(perms: &[(usize, usize)]) -> [u32; M] {
        let mut t = [0u32; M];
        let mut next = [0usize; 16];
        populate(perms, &mut t, &mut next[..perms.len()]).unwrap();
        t
    }

    #[test]
    fn every_position_is_owned_and_shares_are_even() {
        let p = perms(5);
        let t = table(&p[..5]);
        let mut count = [0usize; 5];
        for &b in &t {
            count[b as usize] += 1;
        }
        // Maglev's guarantee: shares differ by a small amount (M/N = 50.2 each here).
        for c in count {
            assert!((45..=56).contains(&c), "uneven shares {count:?}");
        }
        assert_eq!(count.iter().sum::<usize>(), M);
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth() {
        // Maglev's minimal disruption needs M >> N (the datapath uses M = 16381).
        const BIG: usize = 4093;
        const N: usize = 10;
        let p: [(usize, usize); N] =
            core::array::from_fn(|i| permutation(0x0a00_0000 + i as u32, 8080, BIG));
        let mut before = [0u32; BIG];
        populate(&p, &mut before, &mut [0; N]).unwrap();
        for removed in 0..N {
            // The remaining backends, in the same order; `orig` maps back to old indexes.
            let mut rest = [(0, 0); N - 1];
            let mut orig = [0u32; N - 1];
            for (k, i) in (0..N).filter(|&i| i != removed).enumerate() {
                rest[k] = p[i];
                orig[k] = i as u32;
            }
            let mut after = [0u32; BIG];
            populate(&rest, &mut after, &mut [0; N - 1]).unwrap();
            let changed = (0..BIG)
                .filter(|&c| orig[after[c] as usize] != before[c])
                .count();
            let lost = before.iter().filter(|&&b| b == removed as u32).count();
            // The removed backend's ~1/N must move; everything else (ideally nothing) only
            // a little: in total close to 1/N of the table.
            assert!(lost > 0);
            assert!(
                changed <= BIG / N + BIG / 50,
                "removing {removed}: {changed} of {BIG} positions changed ({lost} were its own)"
            );
        }
    }

    #[test]
    fn table_is_deterministic_and_rejects_bad_input() {
        let p = perms(4);
        assert_eq!(table(&p[..4]), table(&p[..4]));
        let mut t = [0u32; 7];
        let mut next = [0usize; 8];
        assert_eq!(
            populate(&[], &mut t, &mut next[..0]),
            Err(MaglevError::BadBackendCount)
        );
        assert_eq!(
            populate(&[(0, 1); 8], &mut t, &mut next),
            Err(MaglevError::BadBackendCount)
        );
        assert_eq!(
            populate(&[(0, 1); 2], &mut t, &mut next[..1]),
            Err(MaglevError::BadBuffers)
        );
        // One backend owns everything.
        populate(&[(3, 2)], &mut t, &mut next[..1]).unwrap();
        assert_eq!(t, [0; 7]);
    }

    #[test]
    fn permutations_are_valid_for_the_datapath_size() {
        for i in 0..100u32 {
            let (offset, skip) =
                permutation(i.wrapping_mul(2_654_435_761), i as u16, MAGLEV_TABLE_SIZE);
            assert!(offset < MAGLEV_TABLE_SIZE);
            assert!((1..MAGLEV_TABLE_SIZE).contains(&skip));
        }
        // Flows spread over the table.
        let mut hit = [false; 64];
        for sport in 0..1000u16 {
            hit[(flow_hash(1, 2, sport, 80, 6) % 64) as usize] = true;
        }
        assert!(hit.iter().all(|h| *h));
    }
}
