//! The rules kube-proxy writes for a [`Scenario`](crate::scenario::Scenario), in its iptables
//! mode (iptables-restore input) and its nftables mode (`nft -f` input). Structure, names and
//! matches follow kube-proxy's proxiers (pkg/proxy/iptables and pkg/proxy/nftables), so the
//! kernel does the same work it does under kube-proxy; the unit tests pin the exact chain names
//! kube-proxy's own tests expect.

pub mod iptables;
pub mod nftables;

use sha2::{Digest, Sha256};

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first `chars` characters of the standard base32 (RFC 4648) encoding of sha256(`input`),
/// as Go's `base32.StdEncoding.EncodeToString(sha256.Sum256(...))[:chars]`.
pub fn hash_prefix(input: &str, chars: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in digest.iter() {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < chars {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
        if out.len() == chars {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_sha256_matches_go() {
        // sha256("") = e3b0c442...; Go: base32.StdEncoding → "4OYMIQUY7QOBJGX36TEJS35ZEQ..."
        assert_eq!(hash_prefix("", 16), "4OYMIQUY7QOBJGX3");
        assert_eq!(hash_prefix("", 3), "4OY");
    }
}
