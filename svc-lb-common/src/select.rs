//! Backend slot choice. Slot 0 of a frontend is the frontend itself; slots `1..=count` hold its
//! backends, so a choice is always in that range.

/// Maps a (random or flow) hash onto a backend slot in `1..=count`; 0 when there is no backend.
#[inline(always)]
pub fn slot_for_hash(hash: u32, count: u16) -> u16 {
    if count == 0 {
        return 0;
    }
    (hash % u32::from(count)) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_backends_is_slot_zero() {
        assert_eq!(slot_for_hash(12345, 0), 0);
    }

    #[test]
    fn slots_cover_one_to_count() {
        let mut seen = [false; 4];
        for h in 0..1000u32 {
            let s = slot_for_hash(h.wrapping_mul(2_654_435_761), 3);
            assert!((1..=3).contains(&s), "slot {s}");
            seen[s as usize] = true;
        }
        assert_eq!(seen, [false, true, true, true]);
    }

    #[test]
    fn extreme_hashes() {
        assert_eq!(
            slot_for_hash(u32::MAX, u16::MAX),
            (u32::MAX % 65535) as u16 + 1
        );
        assert_eq!(slot_for_hash(0, 1), 1);
        assert_eq!(slot_for_hash(u32::MAX, 1), 1);
    }
}
