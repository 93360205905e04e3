//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eqn. 3).
//!
//! Values are 16/32-bit words exactly as they sit in the packet, loaded in native order (the way
//! the datapath reads them). One's-complement sums are byte-order independent, so no swapping is
//! needed as long as the checksum field is read the same way.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let sum = (!check) as u32 + (nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
    !fold(sum)
}

/// New checksum after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}

/// UDP variant: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub const fn udp_replace4(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    mangle_zero(replace4(check, from, to))
}

/// UDP variant of [`replace2`].
#[inline(always)]
pub const fn udp_replace2(check: u16, from: u16, to: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    mangle_zero(replace2(check, from, to))
}

#[inline(always)]
const fn mangle_zero(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

/// One's-complement sum of `data` as big-endian 16-bit words (odd tail padded with zero),
/// added to `initial`. Not folded.
pub fn sum_be(data: &[u8], initial: u32) -> u32 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Full checksum of `data` (e.g. an IPv4 header with its checksum field zeroed), big-endian.
pub fn checksum_be(data: &[u8]) -> u16 {
    !fold(sum_be(data, 0))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (with its checksum field zeroed),
/// big-endian. For UDP a computed 0 must be sent as 0xffff (see [`udp_replace4`]).
pub fn l4_checksum_v4_be(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    !fold(sum_be(segment, sum_be(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 section 3 example words.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_be(&data, 0)), 0xddf2);
    }

    fn ip_header(dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 10, 0, 0, 2, 0, 0, 0, 0,
        ];
        h[16..20].copy_from_slice(&dst);
        let c = checksum_be(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn replace4_matches_full_recompute_in_native_order() {
        let old = ip_header([10, 96, 0, 10]);
        let new = ip_header([10, 200, 1, 2]);
        // Read the way the datapath does: raw bytes as native-endian words.
        let check = u16::from_ne_bytes([old[10], old[11]]);
        let from = u32::from_ne_bytes([10, 96, 0, 10]);
        let to = u32::from_ne_bytes([10, 200, 1, 2]);
        let updated = replace4(check, from, to);
        assert_eq!(updated.to_ne_bytes(), [new[10], new[11]]);
    }

    #[test]
    fn replace2_matches_full_recompute() {
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 0x50;
        seg[13] = 0x02;
        let src = [10, 0, 0, 2];
        let vip = [10, 96, 0, 10];
        let be = [10, 200, 1, 2];
        let c0 = l4_checksum_v4_be(src, vip, 6, &seg);
        let mut seg2 = seg;
        seg2[2..4].copy_from_slice(&8080u16.to_be_bytes());
        let expect = l4_checksum_v4_be(src, be, 6, &seg2);
        let c = u16::from_ne_bytes(c0.to_be_bytes());
        let c = replace4(c, u32::from_ne_bytes(vip), u32::from_ne_bytes(be));
        let c = replace2(
            c,
            u16::from_ne_bytes(80u16.to_be_bytes()),
            u16::from_ne_bytes(8080u16.to_be_bytes()),
        );
        assert_eq!(c.to_ne_bytes(), expect.to_be_bytes());
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }

    #[test]
    fn udp_never_produces_zero() {
        // Find an update whose plain result is 0 and check it becomes 0xffff.
        let check = 0xfffe;
        let r = replace2(check, 0, 1);
        if r == 0 {
            assert_eq!(udp_replace2(check, 0, 1), 0xffff);
        }
        for from in 0..=0xffffu16 {
            if replace2(0x1234, from, 0) == 0 {
                assert_eq!(udp_replace2(0x1234, from, 0), 0xffff);
                return;
            }
        }
        panic!("no zero-producing update found");
    }

    #[test]
    fn odd_length_sum() {
        assert_eq!(sum_be(&[0x12], 0), 0x1200);
    }
}
