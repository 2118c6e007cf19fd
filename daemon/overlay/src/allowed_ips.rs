//! Longest-prefix-match table from addresses to peers (WireGuard's cryptokey routing).

use std::net::IpAddr;

use ipnet::IpNet;

/// Maps networks to peers; lookups return the peer of the longest matching prefix.
///
/// Entries are kept sorted by prefix length (longest first), so a lookup is a scan that stops
/// at the first match. Clusters have tens to hundreds of peers with one or two prefixes each,
/// where a scan over a contiguous vector beats a trie.
#[derive(Debug, Clone)]
pub struct AllowedIps<P> {
    entries: Vec<(IpNet, P)>,
}

impl<P> Default for AllowedIps<P> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<P: Clone + PartialEq> AllowedIps<P> {
    /// Inserts a network for a peer; an identical network is reassigned.
    pub fn insert(&mut self, net: IpNet, peer: P) {
        let net = net.trunc();
        self.entries.retain(|(n, _)| *n != net);
        let pos = self
            .entries
            .iter()
            .position(|(n, _)| n.prefix_len() < net.prefix_len())
            .unwrap_or(self.entries.len());
        self.entries.insert(pos, (net, peer));
    }

    /// Removes every network of a peer.
    pub fn remove_peer(&mut self, peer: &P) {
        self.entries.retain(|(_, p)| p != peer);
    }

    /// The peer owning `addr`, if any.
    pub fn lookup(&self, addr: IpAddr) -> Option<&P> {
        self.entries
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|(_, p)| p)
    }

    /// Whether `addr` belongs to `peer` (the check applied to decrypted inner sources).
    pub fn allows(&self, peer: &P, addr: IpAddr) -> bool {
        self.lookup(addr) == Some(peer)
    }

    /// Networks of a peer.
    pub fn networks_of<'a>(&'a self, peer: &'a P) -> impl Iterator<Item = IpNet> + 'a {
        self.entries
            .iter()
            .filter(move |(_, p)| p == peer)
            .map(|(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::default();
        t.insert(net("10.244.0.0/16"), "wide");
        t.insert(net("10.244.2.0/24"), "narrow");
        t.insert(net("10.244.2.7/32"), "host");
        assert_eq!(t.lookup("10.244.2.7".parse().unwrap()), Some(&"host"));
        assert_eq!(t.lookup("10.244.2.8".parse().unwrap()), Some(&"narrow"));
        assert_eq!(t.lookup("10.244.9.1".parse().unwrap()), Some(&"wide"));
        assert_eq!(t.lookup("10.245.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), None);
    }

    #[test]
    fn reinsert_moves_and_remove_clears() {
        let mut t = AllowedIps::default();
        t.insert(net("10.1.0.0/24"), "a");
        t.insert(net("10.1.0.0/24"), "b");
        assert!(t.allows(&"b", "10.1.0.9".parse().unwrap()));
        assert!(!t.allows(&"a", "10.1.0.9".parse().unwrap()));
        t.insert(net("fd00:1::/64"), "b");
        assert_eq!(t.networks_of(&"b").count(), 2);
        t.remove_peer(&"b");
        assert_eq!(t.lookup("10.1.0.9".parse().unwrap()), None);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = AllowedIps::default();
        t.insert(net("10.1.0.77/24"), "a");
        assert_eq!(t.networks_of(&"a").next(), Some(net("10.1.0.0/24")));
    }
}
