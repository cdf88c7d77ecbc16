//! The hashes behind Maglev placement, written out here so that they can never change under us.
//!
//! Placement must be a pure function of the config: every ringlb node behind one VIP, every
//! restart and every worker must compute the same table and the same slot for a client. So no
//! `RandomState` (random per process) and no `DefaultHasher` (its algorithm is unspecified and
//! may change between Rust releases): one fixed mixer, fixed seeds, fixed byte order.
//! Non-cryptographic on purpose: placement is not a secret, and the data path hashes once per
//! connection.
//!
//! Changing anything in this file moves clients between backends, and during a rolling upgrade
//! nodes on the old and the new version would disagree. The golden tests pin the values.

use std::net::{IpAddr, SocketAddr};

use crate::config::HashKey;

/// Seeds: consecutive 64-bit words of the hexadecimal digits of pi ("nothing up my sleeve").
/// The offset and skip of a backend's permutation must come from two independent hashes.
pub const OFFSET_SEED: u64 = 0x243f_6a88_85a3_08d3;
pub const SKIP_SEED: u64 = 0x1319_8a2e_0370_7344;
pub const KEY_SEED: u64 = 0xa409_3822_299f_31d0;

/// Tags that keep an IPv4 key apart from any IPv6 key (and say which form was hashed).
const V4_TAG: u64 = 4 << 56;
const V6_TAG: u64 = 6 << 56;

/// The splitmix64 finaliser (Stafford's "Mix13", as in `java.util.SplittableRandom`): a
/// bijection on `u64` in which every input bit flips about half of the output bits.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes bytes (a backend's name): little-endian 8-byte words, the last one zero-padded, each
/// folded into the state through [`mix64`], and the length last so that `"a"` and `"a\0"`
/// differ.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(w);
        h = mix64(h ^ u64::from_le_bytes(buf));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(buf));
    }
    mix64(h ^ bytes.len() as u64)
}

/// Hashes the part of a client's address that `key` names: the IP, or the IP and port.
///
/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, how a dual-stack IPv6 socket reports an
/// IPv4 client) hashes as the IPv4 address, so placement does not depend on how a socket sees
/// IPv4 clients (ringlb's own `[::]` listeners are IPv6-only today). Allocation-free: one to
/// three [`mix64`] rounds.
#[inline]
pub fn hash_client(client: &SocketAddr, key: HashKey) -> u64 {
    let port = match key {
        HashKey::Ip => 0,
        HashKey::IpPort => u64::from(client.port()),
    };
    match client.ip().to_canonical() {
        IpAddr::V4(a) => mix64(KEY_SEED ^ V4_TAG ^ (port << 32) ^ u64::from(u32::from(a))),
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let h = mix64(KEY_SEED ^ (bits >> 64) as u64);
            let h = mix64(h ^ bits as u64);
            mix64(h ^ V6_TAG ^ port)
        }
    }
}

/// Maps a 64-bit hash onto `0..n` by multiply-and-shift (Lemire): unbiased to within
/// `n / 2^64`, and cheaper than a division on the data path.
#[inline]
pub fn reduce(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_is_the_published_splitmix64_finaliser() {
        // splitmix64 seeded with 0 outputs mix64(k * 0x9e3779b97f4a7c15) for k = 1, 2, 3:
        // the reference sequence is e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f.
        let gamma: u64 = 0x9e37_79b9_7f4a_7c15;
        assert_eq!(mix64(gamma), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(gamma.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix64(gamma.wrapping_mul(3)), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn hash_bytes_tells_lengths_and_seeds_apart() {
        assert_ne!(hash_bytes(1, b"a"), hash_bytes(1, b"a\0"));
        assert_ne!(hash_bytes(1, b""), hash_bytes(1, b"\0\0\0\0\0\0\0\0"));
        assert_ne!(
            hash_bytes(OFFSET_SEED, b"api1"),
            hash_bytes(SKIP_SEED, b"api1")
        );
    }

    #[test]
    fn an_ipv4_mapped_ipv6_client_hashes_as_its_ipv4_address() {
        let v4: SocketAddr = "192.0.2.7:1234".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:1234".parse().unwrap();
        for key in [HashKey::Ip, HashKey::IpPort] {
            assert_eq!(hash_client(&v4, key), hash_client(&mapped, key));
        }
    }

    #[test]
    fn the_port_counts_only_for_the_ip_port_key() {
        let a: SocketAddr = "[2001:db8::1]:1000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:1001".parse().unwrap();
        assert_eq!(hash_client(&a, HashKey::Ip), hash_client(&b, HashKey::Ip));
        assert_ne!(
            hash_client(&a, HashKey::IpPort),
            hash_client(&b, HashKey::IpPort)
        );
    }

    #[test]
    fn reduce_stays_in_range_and_reaches_both_ends() {
        assert_eq!(reduce(0, 65537), 0);
        assert_eq!(reduce(u64::MAX, 65537), 65536);
        assert_eq!(reduce(u64::MAX / 2, 3), 1);
    }
}
