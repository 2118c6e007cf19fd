//! The pod's network: a veth pair, addresses, gateway neighbours and routes (DESIGN.md §2).
//!
//! Layout after ADD, for a pod with 10.244.1.5 and fd00::5:
//!
//! ```text
//!  pod netns                               host (node) netns
//!  eth0 10.244.1.5/32, fd00::5/128  <-veth->  mist3f2a9c01b7e (mac ee:ee:ee:ee:ee:ee)
//!  default via 169.254.1.1 onlink            10.244.1.5 dev mist3f2a9c01b7e scope link
//!  default via fe80::1 onlink                fd00::5 dev mist3f2a9c01b7e
//!  neigh 169.254.1.1, fe80::1 -> ee:ee:..    neigh 10.244.1.5, fd00::5 -> pod mac
//! ```
//!
//! The gateway is link-local and the host end answers for it: the pod holds permanent
//! neighbour entries for both gateways pointing at the host end's fixed MAC, and proxy ARP is on
//! as a fallback. The host holds permanent neighbour entries for the pod's addresses, so no
//! ARP/ND round trip (nor IPv6 DAD on the host end) delays the first packet.

use std::net::IpAddr;

use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use sha2::{Digest, Sha256};

use crate::netlink::{Netlink, NetlinkError, to_route_addr};

/// Prefix of every host-side veth mistnet creates.
pub const HOST_VETH_PREFIX: &str = "mist";
/// The fixed MAC of host-side veths: the pod's gateway neighbours point at it.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// Pod network setup or inspection failures.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{what} already exists")]
    Exists {
        what: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{step}")]
    Netlink {
        step: String,
        #[source]
        source: NetlinkError,
    },
    #[error("injected failure (tests)")]
    Injected(#[source] std::io::Error),
    #[error("cannot write sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What CHECK found different from what ADD set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift(pub Vec<String>);

/// The deterministic host veth name of an attachment: `mist` + 11 hex digits of
/// SHA-256(containerID NUL ifname), 15 bytes, the kernel's limit.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0u8]);
    h.update(ifname.as_bytes());
    let digest = h.finalize();
    let mut name = String::with_capacity(15);
    name.push_str(HOST_VETH_PREFIX);
    for b in digest.iter().take(6) {
        name.push_str(&format!("{b:02x}"));
    }
    name.truncate(15);
    name
}

/// What to build for one attachment.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub ifname: &'a str,
    pub host_veth: &'a str,
    pub netns_fd: i32,
    pub ips: &'a [IpAddr],
    pub mtu: u32,
    pub gateway_v4: IpAddr,
    pub gateway_v6: IpAddr,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct PodLinks {
    pub host_mac: String,
    pub pod_mac: String,
}

fn nl(step: impl Into<String>) -> impl FnOnce(NetlinkError) -> PodError {
    let step = step.into();
    move |source| PodError::Netlink { step, source }
}

/// Formats a MAC address.
pub fn mac_string(mac: &[u8]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Creates and configures the pod's veth pair. On error the caller deletes the host veth,
/// which removes everything else with it.
pub fn setup(
    host: &mut Netlink,
    pod: &mut Netlink,
    spec: &PodSpec<'_>,
) -> Result<PodLinks, PodError> {
    // One request creates both ends, the pod end already in its namespace with its final name,
    // with MTUs set, and the host end up. The pod end cannot be brought up in the same request:
    // the kernel configures the peer before linking the pair, and opening an unpaired veth
    // fails with ENOTCONN.
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(spec.ifname.to_owned()));
    peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
    peer.attributes.push(LinkAttribute::NetNsFd(spec.netns_fd));
    let mut link = LinkMessage::default();
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    link.attributes
        .push(LinkAttribute::IfName(spec.host_veth.to_owned()));
    link.attributes.push(LinkAttribute::Mtu(spec.mtu));
    link.attributes
        .push(LinkAttribute::Address(HOST_VETH_MAC.to_vec()));
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    host.create(RouteNetlinkMessage::NewLink(link), "create veth")
        .map_err(|source| {
            if source.is_exists() {
                PodError::Exists {
                    what: format!(
                        "interface {} (pod) or {} (host)",
                        spec.ifname, spec.host_veth
                    ),
                    source,
                }
            } else {
                PodError::Netlink {
                    step: "create veth pair".into(),
                    source,
                }
            }
        })?;

    crate::debugknobs::Failpoint::AfterVeth
        .hit()
        .map_err(PodError::Injected)?;
    let pod_link = pod
        .link_by_name(spec.ifname)
        .map_err(nl(format!("find {} in the pod", spec.ifname)))?;
    let pod_idx = pod_link.header.index;
    let pod_mac = link_mac(&pod_link).unwrap_or_default();
    let host_idx = host
        .link_by_name(spec.host_veth)
        .map_err(nl(format!("find host veth {}", spec.host_veth)))?
        .header
        .index;
    let pod_mac_bytes = parse_mac(&pod_mac);

    // Pod side in one batch: link up, addresses, gateway neighbours, default routes.
    let mut up = LinkMessage::default();
    up.header.index = pod_idx;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    let mut pod_batch = vec![(RouteNetlinkMessage::SetLink(up), 0)];
    for ip in spec.ips {
        let gw = gateway_for(spec, *ip);
        pod_batch.push((addr_msg(pod_idx, *ip), CREATE));
        pod_batch.push((
            RouteNetlinkMessage::NewNeighbour(neigh_msg(pod_idx, gw, &HOST_VETH_MAC)),
            REPLACE,
        ));
        pod_batch.push((default_route(pod_idx, gw), CREATE));
    }
    pod.request_batch(pod_batch, "configure pod interface")
        .map_err(nl(format!("configure {} in the pod", spec.ifname)))?;

    // Host side in one batch: a route and a permanent neighbour per pod address.
    let mut host_batch = Vec::with_capacity(2 * spec.ips.len());
    for ip in spec.ips {
        host_batch.push((host_route(host_idx, *ip), CREATE));
        host_batch.push((
            RouteNetlinkMessage::NewNeighbour(neigh_msg(host_idx, *ip, &pod_mac_bytes)),
            REPLACE,
        ));
    }
    host.request_batch(host_batch, "configure host routes")
        .map_err(nl(format!("add host routes via {}", spec.host_veth)))?;

    if spec.ips.iter().any(IpAddr::is_ipv4) {
        write_sysctl(
            &format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", spec.host_veth),
            "1",
        )?;
        ensure_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    if spec.ips.iter().any(IpAddr::is_ipv6) {
        ensure_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(PodLinks {
        host_mac: mac_string(&HOST_VETH_MAC),
        pod_mac,
    })
}

const REPLACE: u16 = netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE;
const CREATE: u16 = netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;

fn gateway_for(spec: &PodSpec<'_>, ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        spec.gateway_v4
    } else {
        spec.gateway_v6
    }
}

fn link_mac(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::Address(m) = a {
            Some(mac_string(m))
        } else {
            None
        }
    })
}

fn parse_mac(s: &str) -> Vec<u8> {
    s.split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect()
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn full_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn addr_msg(index: u32, ip: IpAddr) -> RouteNetlinkMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(ip);
    m.header.prefix_len = full_prefix(ip);
    m.header.index = index;
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(ip));
    } else {
        // The pod's /128 is unique by construction: skip duplicate address detection so the
        // address is usable at once.
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    m.attributes.push(AddressAttribute::Address(ip));
    RouteNetlinkMessage::NewAddress(m)
}

fn neigh_msg(index: u32, ip: IpAddr, mac: &[u8]) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family(ip);
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

fn base_route(ip: IpAddr) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = family(ip);
    r.header.table = RouteHeader::RT_TABLE_MAIN;
    r.header.protocol = RouteProtocol::Boot;
    r.header.kind = RouteType::Unicast;
    r
}

fn default_route(index: u32, gw: IpAddr) -> RouteNetlinkMessage {
    let mut r = base_route(gw);
    r.header.scope = RouteScope::Universe;
    r.header.flags = RouteFlags::Onlink;
    r.attributes
        .push(RouteAttribute::Gateway(to_route_addr(gw)));
    r.attributes.push(RouteAttribute::Oif(index));
    RouteNetlinkMessage::NewRoute(r)
}

fn host_route(index: u32, ip: IpAddr) -> RouteNetlinkMessage {
    let mut r = base_route(ip);
    r.header.scope = RouteScope::Link;
    r.header.destination_prefix_length = full_prefix(ip);
    r.attributes
        .push(RouteAttribute::Destination(to_route_addr(ip)));
    r.attributes.push(RouteAttribute::Oif(index));
    RouteNetlinkMessage::NewRoute(r)
}

fn write_sysctl(path: &str, value: &str) -> Result<(), PodError> {
    std::fs::write(path, value).map_err(|source| PodError::Sysctl {
        path: path.into(),
        source,
    })
}

fn ensure_sysctl(path: &str, value: &str) -> Result<(), PodError> {
    match std::fs::read_to_string(path) {
        Ok(cur) if cur.trim() == value => Ok(()),
        Ok(_) | Err(_) => write_sysctl(path, value),
    }
}

/// Deletes the host veth (and with it the pod end, its addresses, routes and neighbours).
/// Returns whether anything was there.
pub fn teardown(host: &mut Netlink, host_veth: &str) -> Result<bool, NetlinkError> {
    host.delete_link_by_name(host_veth)
}

/// How long to wait for the daemon's deletion to unlist the veth before deleting in-process.
const HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Deletes the host veth like [`teardown`], handing the request to mistnetd when it listens on
/// `daemon_socket`, and returns once the kernel has unlisted the pair (gone from both
/// namespaces, with its addresses, routes and neighbours).
///
/// Unregistering a netdev ends in `rcu_barrier()` and a wait for the last references
/// (`netdev_run_todo`), which the requesting task sits through after the device is already
/// gone: about 17 ms on our machines, more than everything else DEL does together. mistnetd's
/// deleter thread sits through it instead. Without the daemon (restarting, not installed), or
/// if it does not finish in time, the veth is deleted in-process as before.
pub fn teardown_via_daemon(
    host: &mut Netlink,
    host_veth: &str,
    daemon_socket: &std::path::Path,
) -> Result<bool, NetlinkError> {
    let index = match host.link_by_name(host_veth) {
        Ok(l) => l.header.index,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e),
    };
    if !hand_to_daemon(daemon_socket, index, host_veth) {
        return teardown(host, host_veth);
    }
    let deadline = std::time::Instant::now() + HANDOFF_TIMEOUT;
    let mut pause = std::time::Duration::from_micros(50);
    loop {
        match host.link_by_name(host_veth) {
            Err(e) if e.is_not_found() => return Ok(true),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if std::time::Instant::now() >= deadline {
            return teardown(host, host_veth);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(2));
    }
}

/// Asks mistnetd to delete a link; true when it accepted.
fn hand_to_daemon(socket: &std::path::Path, index: u32, name: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(std::time::Duration::from_millis(200));
    if conn.set_read_timeout(timeout).is_err() || conn.set_write_timeout(timeout).is_err() {
        return false;
    }
    if conn
        .write_all(format!("delete-link {index} {name}\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut reply = [0u8; 16];
    matches!(conn.read(&mut reply), Ok(n) if reply[..n].starts_with(b"ok"))
}

/// Compares the live state with what ADD set up.
pub fn check(
    host: &mut Netlink,
    pod: Option<&mut Netlink>,
    spec: &PodSpec<'_>,
) -> Result<Drift, NetlinkError> {
    let mut drift = Vec::new();
    let host_idx = match host.link_by_name(spec.host_veth) {
        Ok(l) => Some(l.header.index),
        Err(e) if e.is_not_found() => {
            drift.push(format!("host veth {} is missing", spec.host_veth));
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(idx) = host_idx {
        let mut routes = host.routes(false)?;
        if spec.ips.iter().any(IpAddr::is_ipv6) {
            routes.extend(host.routes(true)?);
        }
        for ip in spec.ips {
            let ok = routes
                .iter()
                .any(|r| r.dst == Some(*ip) && r.prefix == full_prefix(*ip) && r.oif == Some(idx));
            if !ok {
                drift.push(format!(
                    "host route to {ip} via {} is missing",
                    spec.host_veth
                ));
            }
        }
    }
    let Some(pod) = pod else {
        drift.push("pod network namespace is missing".into());
        return Ok(Drift(drift));
    };
    let pod_link = match pod.link_by_name(spec.ifname) {
        Ok(l) => l,
        Err(e) if e.is_not_found() => {
            drift.push(format!("pod interface {} is missing", spec.ifname));
            return Ok(Drift(drift));
        }
        Err(e) => return Err(e),
    };
    let idx = pod_link.header.index;
    let mtu = pod_link.attributes.iter().find_map(|a| {
        if let LinkAttribute::Mtu(m) = a {
            Some(*m)
        } else {
            None
        }
    });
    if mtu != Some(spec.mtu) {
        drift.push(format!(
            "pod interface MTU is {mtu:?}, expected {}",
            spec.mtu
        ));
    }
    let addrs = pod.addresses(idx)?;
    for ip in spec.ips {
        if !addrs.iter().any(|(a, p)| a == ip && *p == full_prefix(*ip)) {
            drift.push(format!("pod address {ip}/{} is missing", full_prefix(*ip)));
        }
    }
    for (a, p) in &addrs {
        let link_local = match a {
            IpAddr::V4(_) => false,
            IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80,
        };
        if !link_local && !spec.ips.contains(a) {
            drift.push(format!("pod has unexpected address {a}/{p}"));
        }
    }
    for v6 in [false, true] {
        if !spec.ips.iter().any(|ip| ip.is_ipv6() == v6) {
            continue;
        }
        let gw = if v6 { spec.gateway_v6 } else { spec.gateway_v4 };
        let routes = pod.routes(v6)?;
        let ok = routes
            .iter()
            .any(|r| r.dst.is_none() && r.prefix == 0 && r.gw == Some(gw) && r.oif == Some(idx));
        if !ok {
            drift.push(format!("pod default route via {gw} is missing"));
        }
    }
    Ok(Drift(drift))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_deterministic_and_fit_ifnamsiz() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth0")
        );
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("mist"));
        assert!(a[4..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn host_veth_names_differ_by_container_and_ifname() {
        let a = host_veth_name("c1", "eth0");
        assert_ne!(a, host_veth_name("c2", "eth0"));
        assert_ne!(a, host_veth_name("c1", "eth1"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
    }

    #[test]
    fn many_names_do_not_collide() {
        let names: std::collections::BTreeSet<String> = (0..10_000)
            .map(|i| host_veth_name(&format!("container-{i}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(mac_string(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
        assert_eq!(parse_mac("02:0a:ff:00:01:10"), vec![2, 10, 255, 0, 1, 16]);
    }
}
