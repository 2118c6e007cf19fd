//! Node-local IPAM: address pools and the file-locked allocation store.
//!
//! The pool of each address family comes from the node state file's pod CIDR (minus the network
//! address, the first address, which mistnetd uses as the node's own tunnel address, and the
//! IPv4 broadcast), or from `ipam.ranges` in the network config when given. `ipam.reserved`
//! removes addresses from either.
//!
//! The store is one JSON document per boot, `<dataDir>/ipam/<network>/state-<boot id>.json`
//! (dataDir defaults to `/run/mistnet`, see [`crate::config::DEFAULT_DATA_DIR`]), guarded by an
//! exclusive `flock` on `lock` beside it. Allocations live exactly as long as the pods' network
//! namespaces, which never survive a reboot: keying the file by the kernel's boot id makes the
//! store reboot-volatile even where `/run` is not tmpfs, so no address leaks across reboots.
//! Every change is written to a temp file and renamed over the old one, so a crash of the
//! plugin at any point leaves the old or the new state, never a torn one; a power loss can only
//! damage the file of a boot that is over, which is ignored and removed. That is also why the
//! store needs no fsync on the ADD path. Allocation is round-robin from the last address handed out, so an address just
//! released is not reused at once (stale conntrack entries and ARP caches die first).
//! Allocations are keyed by (container ID, interface name) and also record the host veth and
//! the netns path: they are the endpoint records mistnetd reconciles.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{Attachment, IpamConf};
use crate::node_state::NodeState;

/// Version of the store format.
pub const STORE_VERSION: u32 = 1;
/// How long to wait for another plugin instance to release the store lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// IPAM failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free {family} address in the pool")]
    Exhausted { family: Family },
    #[error("no address pool: the node has no pod CIDR and ipam.ranges is empty")]
    NoPool,
    #[error("timed out after {LOCK_TIMEOUT:?} waiting for the IPAM store lock {path}")]
    LockTimeout { path: PathBuf },
    #[error("IPAM store {path}: I/O error")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("IPAM store {path} is corrupt; fix or remove it by hand (it is never overwritten)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

fn family_of(a: IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(f: Family, n: u128) -> IpAddr {
    match f {
        // Values of the V4 family always come from u32s, so the truncation is exact.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// An inclusive address interval of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    lo: u128,
    hi: u128,
}

impl Interval {
    fn len(self) -> u128 {
        self.hi - self.lo + 1
    }
    fn overlap(self, o: Interval) -> u128 {
        let lo = self.lo.max(o.lo);
        let hi = self.hi.min(o.hi);
        if lo > hi { 0 } else { hi - lo + 1 }
    }
}

/// Parses a reserved entry: `IP`, `IP-IP` or `CIDR`.
pub fn parse_reserved(s: &str) -> Result<(IpAddr, IpAddr), String> {
    let s = s.trim();
    if let Some((a, b)) = s.split_once('-') {
        let a: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| "bad start address".to_string())?;
        let b: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| "bad end address".to_string())?;
        if a.is_ipv4() != b.is_ipv4() {
            return Err("start and end are of different families".into());
        }
        if a > b {
            return Err("start is after end".into());
        }
        return Ok((a, b));
    }
    if s.contains('/') {
        let n: IpNet = s.parse().map_err(|_| "bad CIDR".to_string())?;
        return Ok((n.network(), n.broadcast()));
    }
    let a: IpAddr = s
        .parse()
        .map_err(|_| "not an IP, range or CIDR".to_string())?;
    Ok((a, a))
}

/// The addresses one node may hand out, per family.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    ranges: BTreeMap<Family, Vec<Interval>>,
    reserved: BTreeMap<Family, Vec<Interval>>,
    subnets: BTreeMap<Family, IpNet>,
}

impl Pool {
    /// Builds the pool from the node state and the config's IPAM overrides.
    pub fn new(node: Option<&NodeState>, ipam: &IpamConf) -> Result<Self, IpamError> {
        let mut pool = Pool::default();
        for set in &ipam.ranges {
            let Some(first) = set.first() else { continue };
            let fam = family_of(first.subnet.addr());
            let mut ivs = Vec::new();
            for r in set {
                let (lo, hi) = usable(r.subnet, false);
                let lo = r.range_start.map_or(lo, to_u128);
                let hi = r.range_end.map_or(hi, to_u128);
                if lo <= hi {
                    ivs.push(Interval { lo, hi });
                }
            }
            pool.subnets.insert(fam, first.subnet);
            pool.ranges.insert(fam, ivs);
        }
        if let Some(node) = node {
            for cidr in &node.pod_cidrs {
                let fam = family_of(cidr.addr());
                if pool.ranges.contains_key(&fam) {
                    continue;
                }
                let (lo, hi) = usable(*cidr, true);
                pool.subnets.insert(fam, *cidr);
                pool.ranges.insert(fam, vec![Interval { lo, hi }]);
            }
        }
        if pool.ranges.is_empty() {
            return Err(IpamError::NoPool);
        }
        for r in &ipam.reserved {
            // Validated when the config was parsed; an entry that fails here is skipped.
            if let Ok((a, b)) = parse_reserved(r) {
                let iv = Interval {
                    lo: to_u128(a),
                    hi: to_u128(b),
                };
                pool.reserved.entry(family_of(a)).or_default().push(iv);
            }
        }
        for ivs in pool.reserved.values_mut() {
            ivs.sort_by_key(|i| i.lo);
            let mut merged: Vec<Interval> = Vec::with_capacity(ivs.len());
            for iv in ivs.drain(..) {
                match merged.last_mut() {
                    Some(last) if iv.lo <= last.hi.saturating_add(1) => {
                        last.hi = last.hi.max(iv.hi)
                    }
                    Some(_) | None => merged.push(iv),
                }
            }
            *ivs = merged;
        }
        Ok(pool)
    }

    /// The families this pool allocates, IPv4 first.
    pub fn families(&self) -> impl Iterator<Item = Family> + '_ {
        self.ranges.keys().copied()
    }

    /// The subnet an address of `fam` is drawn from (the pod CIDR or the range's subnet).
    pub fn subnet(&self, fam: Family) -> Option<IpNet> {
        self.subnets.get(&fam).copied()
    }

    fn is_reserved(&self, fam: Family, n: u128) -> Option<Interval> {
        self.reserved
            .get(&fam)?
            .iter()
            .find(|iv| iv.lo <= n && n <= iv.hi)
            .copied()
    }

    /// Whether `a` is an address this pool could hand out (in range, not reserved).
    pub fn contains(&self, a: IpAddr) -> bool {
        let fam = family_of(a);
        let n = to_u128(a);
        self.ranges
            .get(&fam)
            .is_some_and(|ivs| ivs.iter().any(|iv| iv.lo <= n && n <= iv.hi))
            && self.is_reserved(fam, n).is_none()
    }

    /// Number of addresses of `fam` not reserved and not in `used`.
    pub fn free(&self, fam: Family, used: &BTreeSet<IpAddr>) -> u128 {
        let Some(ranges) = self.ranges.get(&fam) else {
            return 0;
        };
        let reserved = self.reserved.get(&fam).map(Vec::as_slice).unwrap_or(&[]);
        let mut total: u128 = 0;
        for r in ranges {
            let res: u128 = reserved.iter().map(|x| r.overlap(*x)).sum();
            total = total.saturating_add(r.len().saturating_sub(res));
        }
        let in_use = used.iter().filter(|a| self.contains(**a)).count() as u128;
        total.saturating_sub(in_use)
    }
}

/// Usable host addresses of a subnet as an interval. For node pod CIDRs the first host
/// address belongs to the node.
fn usable(net: IpNet, node_cidr: bool) -> (u128, u128) {
    let lo = to_u128(net.network());
    let hi = to_u128(net.broadcast());
    let skip_first = if node_cidr { 2 } else { 1 };
    match net {
        IpNet::V4(n) if n.prefix_len() >= 31 => (lo, hi),
        IpNet::V4(_) => (lo + skip_first, hi - 1),
        IpNet::V6(n) if n.prefix_len() >= 127 => (lo, hi),
        IpNet::V6(_) => (lo + skip_first, hi),
    }
}

/// One attachment's allocation: the endpoint record mistnetd reconciles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    pub host_veth: String,
    pub netns: String,
}

/// The store's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    /// Allocations keyed by `containerID/ifname`.
    pub allocations: BTreeMap<String, Allocation>,
    /// The last address handed out per family, where round-robin resumes.
    #[serde(default)]
    pub last: BTreeMap<String, IpAddr>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STORE_VERSION,
            allocations: BTreeMap::new(),
            last: BTreeMap::new(),
        }
    }
}

/// The key of an attachment in the store.
pub fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

fn fam_key(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

impl State {
    /// Every address in use.
    pub fn used(&self) -> BTreeSet<IpAddr> {
        self.allocations
            .values()
            .flat_map(|a| a.ips.iter().copied())
            .collect()
    }

    /// The allocation of an attachment, if any.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.allocations.get(&key(container_id, ifname))
    }

    /// Picks one address per pool family for a new attachment and records it. Nothing changes
    /// when any family is exhausted.
    pub fn allocate(
        &mut self,
        pool: &Pool,
        mut record: Allocation,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let used = self.used();
        let mut ips = Vec::new();
        for fam in pool.families() {
            let ip = self.next_free(pool, fam, &used)?;
            ips.push(ip);
        }
        for ip in &ips {
            self.last.insert(fam_key(family_of(*ip)).into(), *ip);
        }
        record.ips = ips.clone();
        self.allocations
            .insert(key(&record.container_id, &record.ifname), record);
        Ok(ips)
    }

    fn next_free(
        &self,
        pool: &Pool,
        fam: Family,
        used: &BTreeSet<IpAddr>,
    ) -> Result<IpAddr, IpamError> {
        let ranges = pool.ranges.get(&fam).map(Vec::as_slice).unwrap_or(&[]);
        if pool.free(fam, used) == 0 {
            return Err(IpamError::Exhausted { family: fam });
        }
        let start = self
            .last
            .get(fam_key(fam))
            .map(|a| to_u128(*a).wrapping_add(1))
            .unwrap_or(0);
        // Scan ranges from the one holding `start`, wrapping around once. Reserved intervals are
        // skipped in one jump, so the scan is bounded by the number of used addresses.
        let first = ranges.iter().position(|r| start <= r.hi).unwrap_or(0);
        for i in 0..=ranges.len() {
            let r = ranges[(first + i) % ranges.len()];
            let mut n = if i == 0 { start.max(r.lo) } else { r.lo };
            while n <= r.hi {
                if let Some(res) = pool.is_reserved(fam, n) {
                    n = match res.hi.checked_add(1) {
                        Some(x) => x,
                        None => break,
                    };
                    continue;
                }
                let ip = from_u128(fam, n);
                if !used.contains(&ip) {
                    return Ok(ip);
                }
                n += 1;
            }
        }
        Err(IpamError::Exhausted { family: fam })
    }

    /// Removes an attachment's allocation, returning it.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        self.allocations.remove(&key(container_id, ifname))
    }

    /// Removes every allocation not listed in `valid`, returning the removed ones.
    pub fn gc(&mut self, valid: &[Attachment]) -> Vec<Allocation> {
        let keep: BTreeSet<String> = valid
            .iter()
            .map(|a| key(&a.container_id, &a.ifname))
            .collect();
        let stale: Vec<String> = self
            .allocations
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        stale
            .into_iter()
            .filter_map(|k| self.allocations.remove(&k))
            .collect()
    }
}

/// The locked store of one network. The lock is held until the value is dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    boot: String,
    _lock: File,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), which names the store file.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .unwrap_or_else(|| "unknown-boot".to_owned())
}

fn state_path(dir: &Path, boot: &str) -> PathBuf {
    dir.join(format!("state-{boot}.json"))
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and takes its exclusive lock.
    pub fn lock(dir: &Path) -> Result<Self, IpamError> {
        let io_err = |source| IpamError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| IpamError::Io {
                path: lock_path.clone(),
                source,
            })?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut backoff = Duration::from_micros(200);
        loop {
            // SAFETY: flock on a file descriptor owned by `file`, which outlives the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK)
                && err.kind() != io::ErrorKind::Interrupted
            {
                return Err(IpamError::Io {
                    path: lock_path,
                    source: err,
                });
            }
            if Instant::now() >= deadline {
                return Err(IpamError::LockTimeout { path: lock_path });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
        Ok(Self {
            dir: dir.to_owned(),
            boot: boot_id(),
            _lock: file,
        })
    }

    fn state_path(&self) -> PathBuf {
        state_path(&self.dir, &self.boot)
    }

    /// Reads the state; a missing file is an empty state.
    pub fn load(&self) -> Result<State, IpamError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(IpamError::Io { path, source }),
        }
    }

    /// Writes the state atomically. The first write of a boot removes the files of earlier
    /// boots.
    pub fn save(&self, state: &State) -> Result<(), IpamError> {
        let path = self.state_path();
        let first_of_boot = !path.exists();
        let json = serde_json::to_vec(state).map_err(|e| IpamError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        crate::fsutil::write_atomic(&path, &json, crate::fsutil::Sync::None).map_err(|source| {
            IpamError::Io {
                path: path.clone(),
                source,
            }
        })?;
        if first_of_boot && let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("state") && name.ends_with(".json") && e.path() != path {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

/// Reads a network's allocations without taking the lock (for mistnetd and tools: the atomic
/// rename guarantees a consistent snapshot).
pub fn read_snapshot(dir: &Path) -> Result<State, IpamError> {
    let path = state_path(dir, &boot_id());
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| IpamError::Corrupt { path, source })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(IpamError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RangeConf;

    fn node(cidrs: &[&str]) -> NodeState {
        NodeState::new(
            "n1",
            cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            1420,
        )
    }

    fn rec(cid: &str) -> Allocation {
        Allocation {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ips: vec![],
            host_veth: "mistx".into(),
            netns: "/x".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_cidr_skips_network_node_and_broadcast() {
        let pool = Pool::new(Some(&node(&["10.244.1.0/29"])), &IpamConf::default()).unwrap();
        let mut st = State::default();
        let got: Vec<IpAddr> = (0..5)
            .map(|i| st.allocate(&pool, rec(&format!("c{i}"))).unwrap()[0])
            .collect();
        assert_eq!(
            got,
            [
                "10.244.1.2",
                "10.244.1.3",
                "10.244.1.4",
                "10.244.1.5",
                "10.244.1.6"
            ]
            .map(ip)
        );
        assert!(matches!(
            st.allocate(&pool, rec("c5")),
            Err(IpamError::Exhausted { family: Family::V4 })
        ));
        assert_eq!(
            st.allocations.len(),
            5,
            "a failed allocation changes nothing"
        );
    }

    #[test]
    fn dual_stack_allocates_one_per_family() {
        let pool = Pool::new(
            Some(&node(&["10.244.1.0/24", "fd00:244:1::/64"])),
            &IpamConf::default(),
        )
        .unwrap();
        let mut st = State::default();
        let ips = st.allocate(&pool, rec("a")).unwrap();
        assert_eq!(ips, vec![ip("10.244.1.2"), ip("fd00:244:1::2")]);
    }

    #[test]
    fn release_then_round_robin_does_not_reuse_immediately() {
        let pool = Pool::new(Some(&node(&["10.244.1.0/29"])), &IpamConf::default()).unwrap();
        let mut st = State::default();
        st.allocate(&pool, rec("a")).unwrap();
        st.allocate(&pool, rec("b")).unwrap();
        assert!(st.release("a", "eth0").is_some());
        assert!(st.release("a", "eth0").is_none(), "release is idempotent");
        assert_eq!(
            st.allocate(&pool, rec("c")).unwrap(),
            vec![ip("10.244.1.4")]
        );
        // Wraps around to the released address once the end is reached.
        st.allocate(&pool, rec("d")).unwrap();
        st.allocate(&pool, rec("e")).unwrap();
        assert_eq!(
            st.allocate(&pool, rec("f")).unwrap(),
            vec![ip("10.244.1.2")]
        );
    }

    #[test]
    fn reserved_and_ranges_are_honoured() {
        let ipam = IpamConf {
            kind: None,
            ranges: vec![vec![
                RangeConf {
                    subnet: "10.9.0.0/24".parse().unwrap(),
                    range_start: Some(ip("10.9.0.10")),
                    range_end: Some(ip("10.9.0.14")),
                },
                RangeConf {
                    subnet: "10.9.1.0/24".parse().unwrap(),
                    range_start: Some(ip("10.9.1.5")),
                    range_end: Some(ip("10.9.1.5")),
                },
            ]],
            reserved: vec!["10.9.0.11-10.9.0.12".into(), "10.9.0.14".into()],
        };
        // The node's IPv4 CIDR is replaced by the range set; its IPv6 one stays.
        let pool = Pool::new(Some(&node(&["10.244.1.0/24"])), &ipam).unwrap();
        let mut st = State::default();
        let got: Vec<IpAddr> = (0..3)
            .map(|i| st.allocate(&pool, rec(&format!("c{i}"))).unwrap()[0])
            .collect();
        assert_eq!(got, ["10.9.0.10", "10.9.0.13", "10.9.1.5"].map(ip));
        assert!(st.allocate(&pool, rec("x")).is_err());
        assert_eq!(pool.free(Family::V4, &st.used()), 0);
    }

    #[test]
    fn free_counts_large_v6_pools_without_overflow() {
        let pool = Pool::new(Some(&node(&["fd00::/64"])), &IpamConf::default()).unwrap();
        assert_eq!(pool.free(Family::V6, &BTreeSet::new()), (1u128 << 64) - 2);
    }

    #[test]
    fn gc_releases_everything_not_valid() {
        let pool = Pool::new(Some(&node(&["10.244.1.0/24"])), &IpamConf::default()).unwrap();
        let mut st = State::default();
        for c in ["a", "b", "c"] {
            st.allocate(&pool, rec(c)).unwrap();
        }
        let gone = st.gc(&[Attachment {
            container_id: "b".into(),
            ifname: "eth0".into(),
        }]);
        let mut ids: Vec<_> = gone.iter().map(|a| a.container_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "c"]);
        assert!(st.get("b", "eth0").is_some());
        assert!(st.gc(&[]).len() == 1);
    }

    #[test]
    fn no_pool_is_an_error() {
        assert!(matches!(
            Pool::new(None, &IpamConf::default()),
            Err(IpamError::NoPool)
        ));
    }

    #[test]
    fn reserved_parsing() {
        assert_eq!(
            parse_reserved("10.0.0.1").unwrap(),
            (ip("10.0.0.1"), ip("10.0.0.1"))
        );
        assert_eq!(
            parse_reserved("10.0.0.0/30").unwrap(),
            (ip("10.0.0.0"), ip("10.0.0.3"))
        );
        assert!(parse_reserved("10.0.0.5-10.0.0.1").is_err());
        assert!(parse_reserved("10.0.0.1-fd00::1").is_err());
        assert!(parse_reserved("x").is_err());
    }

    #[test]
    fn store_round_trips_and_never_overwrites_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::lock(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let pool = Pool::new(Some(&node(&["10.244.1.0/24"])), &IpamConf::default()).unwrap();
        let mut st = State::default();
        st.allocate(&pool, rec("a")).unwrap();
        store.save(&st).unwrap();
        assert_eq!(store.load().unwrap(), st);
        assert_eq!(read_snapshot(dir.path()).unwrap(), st);
        std::fs::write(state_path(dir.path(), &boot_id()), b"{garbage").unwrap();
        assert!(matches!(store.load(), Err(IpamError::Corrupt { .. })));
    }

    #[test]
    fn files_of_earlier_boots_are_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir
            .path()
            .join("state-00000000-dead-beef-0000-000000000000.json");
        // A torn file, as a power loss could leave it.
        std::fs::write(&old, b"{\"version\":1,\"alloc").unwrap();
        let store = Store::lock(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let pool = Pool::new(Some(&node(&["10.244.1.0/24"])), &IpamConf::default()).unwrap();
        let mut st = State::default();
        st.allocate(&pool, rec("a")).unwrap();
        store.save(&st).unwrap();
        assert!(!old.exists());
        assert_eq!(read_snapshot(dir.path()).unwrap(), st);
    }

    #[test]
    fn lock_is_exclusive_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::lock(dir.path()).unwrap();
        let path = dir.path().to_owned();
        let t = std::thread::spawn(move || {
            let _second = Store::lock(&path).unwrap();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        let released = Instant::now();
        drop(first);
        let acquired = t.join().unwrap();
        assert!(acquired >= released);
    }
}
