//! Networks looked up by address in a bounded number of probes, for the access lists' snapshot.
//!
//! One hash map per prefix length present, longest first: an address is masked to each length
//! and probed once, so a lookup costs one probe per distinct prefix length (at most 33 for
//! IPv4, 129 for IPv6; block lists use a handful) however many networks there are. With more
//! than [`SUMMARY_FROM`] IPv4 lengths, a table indexed by an address's first 16 bits says
//! which lengths have networks around it: an address far from every network (most clients)
//! then costs that one load, and one near a few costs a probe for each of their lengths.
//!
//! The maps hash with foldhash's per-map random seed: automatic blocks put client-chosen
//! addresses in them, and a fixed hash would let a client that can pick addresses (an IPv6
//! /64) aim them at one bucket.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Values keyed by network, found by an address the networks contain.
#[derive(Debug)]
pub(super) struct NetMap<V> {
    /// `(prefix length, networks of that length by network address)`, longest first.
    v4: Vec<(u8, Map<u32, V>)>,
    v6: Vec<(u8, Map<u128, V>)>,
    /// By an IPv4 address's first 16 bits: bit `n - 1` set when a network of length `n`
    /// (1 to 32) contains addresses starting so. Built by [`NetMap::summarise`]; `None`: every
    /// length is probed.
    v4_summary: Option<Box<[u32]>>,
}

/// IPv4 prefix lengths probed without a summary; past this, [`NetMap::summarise`] builds one.
/// Two probes cost about what the summary's load does.
pub(super) const SUMMARY_FROM: usize = 2;

impl<V> Default for NetMap<V> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            v4_summary: None,
        }
    }
}

impl<V> NetMap<V> {
    /// Adds `net`, replacing its previous value. Drops the summary: call
    /// [`NetMap::summarise`] once done inserting.
    pub(super) fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        self.v4_summary = None;
        match net {
            IpNet::V4(n) => insert(&mut self.v4, n.prefix_len(), n.network().to_bits(), value),
            IpNet::V6(n) => insert(&mut self.v6, n.prefix_len(), n.network().to_bits(), value),
        }
    }

    /// Builds the IPv4 summary, if there are enough prefix lengths for it to pay.
    pub(super) fn summarise(&mut self) {
        if self.v4.len() <= SUMMARY_FROM {
            return;
        }
        let mut summary = vec![0u32; 1 << 16].into_boxed_slice();
        for (len, map) in &self.v4 {
            let Some(bit) = len.checked_sub(1).map(|b| 1u32 << b) else {
                continue; // 0.0.0.0/0 is probed always
            };
            // The /16s a network touches: itself (16 or longer), or all it covers.
            let span = 1usize << 16u8.saturating_sub(*len);
            for net in map.keys() {
                let first = (net >> 16) as usize;
                for s in summary.iter_mut().skip(first).take(span) {
                    *s |= bit;
                }
            }
        }
        self.v4_summary = Some(summary);
    }

    /// Whether no network is held.
    pub(super) fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The first answer of `accept` for the networks containing `addr` whose prefix is at most
    /// `max_len` long, most specific first.
    #[inline]
    pub(super) fn find<R>(
        &self,
        addr: IpAddr,
        max_len: u8,
        accept: impl FnMut(&V) -> Option<R>,
    ) -> Option<R> {
        match addr {
            IpAddr::V4(a) => {
                let a = a.to_bits();
                match &self.v4_summary {
                    None => find(&self.v4, a, max_len, accept),
                    Some(summary) => {
                        let near = summary.get((a >> 16) as usize).copied().unwrap_or(0);
                        // Bit `len - 1` for each length around `a`; length 0 always.
                        let max_len = max_len.min(32);
                        let wanted = (u64::from(near) << 1 | 1) & (u64::MAX >> (63 - max_len));
                        find_in(&self.v4, a, wanted, accept)
                    }
                }
            }
            IpAddr::V6(a) => find(&self.v6, a.to_bits(), max_len, accept),
        }
    }
}

/// An address as an integer, masked to a prefix.
trait Bits: Copy + Eq + Hash {
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    #[inline]
    fn masked(self, len: u8) -> u32 {
        // A zero-length prefix shifts by the full width: no bits kept.
        self & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }
}

impl Bits for u128 {
    #[inline]
    fn masked(self, len: u8) -> u128 {
        self & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }
}

fn insert<K: Bits, V>(lens: &mut Vec<(u8, Map<K, V>)>, len: u8, key: K, value: V) -> Option<V> {
    let i = match lens.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(i) => i,
        Err(i) => {
            lens.insert(i, (len, Map::default()));
            i
        }
    };
    lens.get_mut(i)?.1.insert(key.masked(len), value)
}

/// [`find`] probing only the lengths whose bit is set in `wanted` (bit `len`).
#[inline]
fn find_in<V, R>(
    lens: &[(u8, Map<u32, V>)],
    addr: u32,
    wanted: u64,
    mut accept: impl FnMut(&V) -> Option<R>,
) -> Option<R> {
    lens.iter()
        .filter(|(len, _)| wanted & (1 << len) != 0)
        .find_map(|(len, map)| map.get(&addr.masked(*len)).and_then(&mut accept))
}

#[inline]
fn find<K: Bits, V, R>(
    lens: &[(u8, Map<K, V>)],
    addr: K,
    max_len: u8,
    mut accept: impl FnMut(&V) -> Option<R>,
) -> Option<R> {
    lens.iter()
        .filter(|(len, _)| *len <= max_len)
        .find_map(|(len, map)| map.get(&addr.masked(*len)).and_then(&mut accept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_most_specific_network_answers_first() {
        the_most_specific_network_answers_first_in(false);
        the_most_specific_network_answers_first_in(true);
    }

    fn the_most_specific_network_answers_first_in(summarised: bool) {
        let mut m = NetMap::default();
        for (n, v) in [
            ("10.0.0.0/8", 8),
            ("10.1.0.0/16", 16),
            ("10.1.2.3/32", 32),
            ("0.0.0.0/0", 0),
            ("2001:db8::/32", 32),
            ("::/0", 0),
        ] {
            assert_eq!(m.insert(net(n), v), None);
        }
        if summarised {
            m.summarise();
            assert!(m.v4_summary.is_some());
        }
        let first = |m: &NetMap<u8>, a: &str| m.find(ip(a), u8::MAX, |v| Some(*v));
        assert_eq!(first(&m, "10.1.2.3"), Some(32));
        assert_eq!(first(&m, "10.1.2.4"), Some(16));
        assert_eq!(first(&m, "10.2.0.0"), Some(8));
        assert_eq!(first(&m, "192.0.2.1"), Some(0));
        assert_eq!(first(&m, "2001:db8::1"), Some(32));
        assert_eq!(first(&m, "2001:db9::1"), Some(0));
        // Skipping the answers `accept` refuses, and the prefixes longer than asked.
        assert_eq!(
            m.find(ip("10.1.2.3"), u8::MAX, |v| (*v < 16).then_some(*v)),
            Some(8)
        );
        assert_eq!(m.find(ip("10.1.2.3"), 16, |v| Some(*v)), Some(16));
        assert_eq!(m.insert(net("10.1.0.0/16"), 160), Some(16));
        m.summarise();
        assert_eq!(first(&m, "10.1.9.9"), Some(160));
    }

    proptest::proptest! {
        /// The lookup finds what a scan of every network finds: the longest prefix that
        /// contains the address, or nothing. Short prefixes and probes near the networks
        /// make hits likely.
        #[test]
        fn finds_what_a_scan_finds(
            nets in proptest::collection::vec((proptest::prelude::any::<u32>(), 0u8..=32), 0..64),
            probes in proptest::collection::vec((0usize..64, proptest::prelude::any::<u32>(), 0u32..32), 1..32),
        ) {
            let nets: Vec<IpNet> = nets
                .into_iter()
                .map(|(a, len)| {
                    let n = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from_bits(a), len).unwrap();
                    IpNet::V4(n.trunc())
                })
                .collect();
            let mut m = NetMap::default();
            for n in &nets {
                m.insert(*n, n.prefix_len());
            }
            let mut summarised = NetMap::default();
            for n in &nets {
                summarised.insert(*n, n.prefix_len());
            }
            summarised.summarise();
            for (near, noise, flip) in probes {
                let base = nets.get(near).map_or(noise, |n| match n.network() {
                    IpAddr::V4(a) => a.to_bits(),
                    IpAddr::V6(_) => noise,
                });
                let addr = IpAddr::from(std::net::Ipv4Addr::from_bits(base ^ (1 << flip)));
                let scanned = nets.iter().filter(|n| n.contains(&addr)).map(IpNet::prefix_len).max();
                proptest::prop_assert_eq!(m.find(addr, u8::MAX, |v| Some(*v)), scanned);
                proptest::prop_assert_eq!(summarised.find(addr, u8::MAX, |v| Some(*v)), scanned);
                let upto = nets.get(near).map_or(32, IpNet::prefix_len);
                let scanned = nets
                    .iter()
                    .filter(|n| n.prefix_len() <= upto && n.contains(&addr))
                    .map(IpNet::prefix_len)
                    .max();
                proptest::prop_assert_eq!(summarised.find(addr, upto, |v| Some(*v)), scanned);
            }
        }
    }

    #[test]
    fn an_empty_map_finds_nothing() {
        let m: NetMap<()> = NetMap::default();
        assert!(m.is_empty());
        assert_eq!(m.find(ip("192.0.2.1"), u8::MAX, |_| Some(())), None);
    }
}
