//! The CNI verbs: ADD, DEL, CHECK, VERSION, GC, STATUS.
//!
//! Every verb is a function from (environment, stdin) to an optional stdout document or a
//! [`CniError`]; `main` only does the process plumbing. Order of work in ADD is chosen so that
//! a crash at any point is recoverable: the allocation is recorded (with the deterministic host
//! veth name) before the veth exists, so DEL or GC can always find and remove what a killed ADD
//! left; a failing ADD removes the veth and releases the allocation itself.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::config::{LATEST_VERSION, NetConf, SUPPORTED_VERSIONS, Version};
use crate::debugknobs::Failpoint;
use crate::error::{CniError, Code};
use crate::ipam::{Allocation, IpamError, Pool, Store};
use crate::netlink::Netlink;
use crate::netns::{self, Netns, NetnsError};
use crate::node_state::{NodeState, NodeStateError};
use crate::pod::{self, PodError, PodSpec};
use crate::result::{CniResult, Interface, IpConfig, Route};

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
}

impl CniEnv {
    /// Reads the CNI_* variables of this process.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
        }
    }
}

/// Runs the verb named by `CNI_COMMAND`.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let Some(cmd) = env.command.as_deref() else {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            "CNI_COMMAND is not set",
            "",
        ));
    };
    match cmd {
        "ADD" => cmd_add(env, stdin).map(Some),
        "DEL" => cmd_del(env, stdin).map(|()| None),
        "CHECK" => cmd_check(env, stdin).map(|()| None),
        "GC" => cmd_gc(stdin).map(|()| None),
        "STATUS" => cmd_status(stdin).map(|()| None),
        "VERSION" => Ok(Some(version_json())),
        other => Err(CniError::new(
            Code::InvalidEnvironment,
            "unknown CNI_COMMAND",
            format!("\"{other}\" is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
        )),
    }
}

/// The VERSION answer.
pub fn version_json() -> String {
    json!({"cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn require<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    v.as_deref()
        .ok_or_else(|| CniError::new(Code::InvalidEnvironment, format!("{name} is not set"), ""))
}

fn container_id(env: &CniEnv) -> Result<&str, CniError> {
    let id = require(&env.container_id, "CNI_CONTAINERID")?;
    let ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            "invalid CNI_CONTAINERID",
            format!("\"{id}\" may hold only letters, digits, '_', '.', '-'"),
        ));
    }
    Ok(id)
}

fn ifname(env: &CniEnv) -> Result<&str, CniError> {
    let name = require(&env.ifname, "CNI_IFNAME")?;
    let ok = name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if !ok {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            "invalid CNI_IFNAME",
            format!(
                "\"{name}\" is not a valid interface name (at most 15 bytes, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(name)
}

fn ipam_err(e: IpamError) -> CniError {
    let code = match &e {
        IpamError::Exhausted { .. } | IpamError::LockTimeout { .. } => Code::TryAgainLater,
        IpamError::NoPool => Code::InvalidConfig,
        IpamError::Io { .. } | IpamError::Corrupt { .. } => Code::IoFailure,
    };
    CniError::with_source(code, "IPAM failed", &e)
}

fn node_err(e: NodeStateError) -> CniError {
    CniError::with_source(Code::TryAgainLater, "node state is not available", &e)
}

fn netns_err(e: NetnsError) -> CniError {
    let code = match &e {
        NetnsError::Missing { .. } => Code::UnknownContainer,
        NetnsError::NotNetns { .. } => Code::InvalidEnvironment,
        NetnsError::Open { .. } | NetnsError::Setns { .. } => Code::IoFailure,
    };
    CniError::with_source(code, "cannot use the container's network namespace", &e)
}

fn io_err(msg: &str, e: &(dyn std::error::Error + 'static)) -> CniError {
    CniError::with_source(Code::IoFailure, msg, e)
}

/// Opens netlink sockets in the host namespace and in `ns`.
fn sockets(ns: &Netns) -> Result<(Netlink, Netlink), CniError> {
    let home = Netns::current().map_err(netns_err)?;
    let host = Netlink::open().map_err(|e| io_err("cannot open netlink", &e))?;
    let pod = ns
        .run(&home, Netlink::open)
        .map_err(netns_err)?
        .map_err(|e| io_err("cannot open netlink in the pod", &e))?;
    Ok((host, pod))
}

fn cmd_add(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    let conf = NetConf::parse(stdin)?;
    let cid = container_id(env)?;
    let ifname = ifname(env)?;
    let netns_path = require(&env.netns, "CNI_NETNS")?;
    let node = NodeState::load(&conf.node_state_file).map_err(node_err)?;
    let pool = Pool::new(Some(&node), &conf.ipam).map_err(ipam_err)?;
    let ns = Netns::open(netns_path).map_err(netns_err)?;
    let host_veth = pod::host_veth_name(cid, ifname);
    let mtu = conf.mtu.unwrap_or(node.mtu);

    let ips = {
        let store = Store::lock(&conf.ipam_dir()).map_err(ipam_err)?;
        let mut state = store.load().map_err(ipam_err)?;
        if state.get(cid, ifname).is_some() {
            return Err(CniError::new(
                Code::AlreadyExists,
                "attachment already exists",
                format!(
                    "container {cid} already has {ifname} on network {}; DEL it first",
                    conf.name
                ),
            ));
        }
        let record = Allocation {
            container_id: cid.to_owned(),
            ifname: ifname.to_owned(),
            ips: Vec::new(),
            host_veth: host_veth.clone(),
            netns: netns_path.to_owned(),
        };
        let ips = state.allocate(&pool, record).map_err(ipam_err)?;
        store.save(&state).map_err(ipam_err)?;
        ips
    };
    debug!(container = cid, ?ips, "allocated");
    if let Err(e) = Failpoint::AfterAlloc.hit() {
        release(&conf, cid, ifname);
        return Err(io_err("injected failure", &e));
    }

    let spec = PodSpec {
        ifname,
        host_veth: &host_veth,
        netns_fd: ns.fd(),
        ips: &ips,
        mtu,
        gateway_v4: IpAddr::V4(node.gateway_v4),
        gateway_v6: IpAddr::V6(node.gateway_v6),
    };
    let built = sockets(&ns).and_then(|(mut host, mut podnl)| {
        pod::setup(&mut host, &mut podnl, &spec).map_err(|e| {
            let created = !matches!(e, PodError::Exists { .. });
            if created && let Err(te) = pod::teardown(&mut host, &host_veth) {
                warn!(error = %te, veth = %host_veth, "rollback: cannot delete veth");
            }
            let code = match &e {
                PodError::Exists { .. } => Code::AlreadyExists,
                PodError::Netlink { .. } | PodError::Sysctl { .. } | PodError::Injected(_) => {
                    Code::IoFailure
                }
            };
            CniError::with_source(code, "cannot set up the pod network", &e)
        })
    });
    let links = match built {
        Ok(l) => l,
        Err(e) => {
            release(&conf, cid, ifname);
            return Err(e);
        }
    };
    info!(container = cid, ifname, veth = %host_veth, "pod network added");

    let ours = CniResult {
        interfaces: vec![
            Interface {
                name: host_veth.clone(),
                mac: Some(links.host_mac),
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: ifname.to_owned(),
                mac: Some(links.pod_mac),
                mtu: Some(mtu),
                sandbox: Some(netns_path.to_owned()),
            },
        ],
        ips: ips
            .iter()
            .map(|ip| IpConfig {
                address: IpNet::from(*ip),
                gateway: Some(spec_gateway(&node, *ip)),
                interface: Some(1),
            })
            .collect(),
        routes: ips
            .iter()
            .map(|ip| Route {
                dst: default_dst(*ip),
                gw: Some(spec_gateway(&node, *ip)),
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    let result = match conf.prev_result.clone() {
        Some(prev) => prev.merge(ours),
        None => ours,
    };
    Ok(result.to_value(conf.cni_version).to_string())
}

fn spec_gateway(node: &NodeState, ip: IpAddr) -> IpAddr {
    node.gateway_for(ip)
}

fn default_dst(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    }
}

/// Best-effort release during an ADD rollback.
fn release(conf: &NetConf, cid: &str, ifname: &str) {
    let res = Store::lock(&conf.ipam_dir()).and_then(|store| {
        let mut state = store.load()?;
        if state.release(cid, ifname).is_some() {
            store.save(&state)?;
        }
        Ok(())
    });
    if let Err(e) = res {
        warn!(error = %e, container = cid, "rollback: cannot release allocation (GC will)");
    }
}

fn cmd_del(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let cid = container_id(env)?;
    let ifname = ifname(env)?;
    let host_veth = pod::host_veth_name(cid, ifname);
    // The veth goes first: an address is only released once nothing can still use it.
    let mut host = Netlink::open().map_err(|e| io_err("cannot open netlink", &e))?;
    let existed = pod::teardown_via_daemon(&mut host, &host_veth, &conf.daemon_socket)
        .map_err(|e| io_err("cannot delete the pod's veth", &e))?;
    let store = Store::lock(&conf.ipam_dir()).map_err(ipam_err)?;
    let mut state = store.load().map_err(ipam_err)?;
    let released = state.release(cid, ifname);
    if released.is_some() {
        store.save(&state).map_err(ipam_err)?;
    }
    info!(
        container = cid,
        ifname,
        veth_existed = existed,
        released = released.is_some(),
        "pod network deleted"
    );
    Ok(())
}

fn cmd_check(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    if conf.cni_version < Version::V0_4_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "CHECK is not supported by this cniVersion",
            format!(
                "cniVersion {} predates CHECK (0.4.0)",
                conf.cni_version.as_str()
            ),
        ));
    }
    let cid = container_id(env)?;
    let ifname = ifname(env)?;
    let netns_path = require(&env.netns, "CNI_NETNS")?;
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(
            Code::InvalidConfig,
            "CHECK requires prevResult",
            "",
        ));
    };
    let node = NodeState::load(&conf.node_state_file).map_err(node_err)?;
    let state = crate::ipam::read_snapshot(&conf.ipam_dir()).map_err(ipam_err)?;
    let mut drift = Vec::new();
    let ips: Vec<IpAddr> = match state.get(cid, ifname) {
        Some(a) => a.ips.clone(),
        None => {
            drift.push(format!("no IPAM allocation for {cid}/{ifname}"));
            Vec::new()
        }
    };
    // The addresses prevResult reports for our pod interface must be the allocated ones.
    let pod_iface = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref() == Some(netns_path));
    let mut reported: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_some() && ip.interface == pod_iface)
        .map(|ip| ip.address.addr())
        .collect();
    reported.sort();
    let mut expected = ips.clone();
    expected.sort();
    if pod_iface.is_none() {
        drift.push(format!(
            "prevResult has no interface {ifname} in {netns_path}"
        ));
    } else if reported != expected {
        drift.push(format!(
            "prevResult addresses {reported:?} differ from the allocation {expected:?}"
        ));
    }
    let host_veth = pod::host_veth_name(cid, ifname);
    let ns = match Netns::open(netns_path) {
        Ok(ns) => Some(ns),
        Err(NetnsError::Missing { .. }) => None,
        Err(e) => return Err(netns_err(e)),
    };
    let (mut host, mut podnl) = match &ns {
        Some(ns) => {
            let (h, p) = sockets(ns)?;
            (h, Some(p))
        }
        None => (
            Netlink::open().map_err(|e| io_err("cannot open netlink", &e))?,
            None,
        ),
    };
    let spec = PodSpec {
        ifname,
        host_veth: &host_veth,
        netns_fd: ns.as_ref().map_or(-1, Netns::fd),
        ips: &ips,
        mtu: conf.mtu.unwrap_or(node.mtu),
        gateway_v4: IpAddr::V4(node.gateway_v4),
        gateway_v6: IpAddr::V6(node.gateway_v6),
    };
    let live = pod::check(&mut host, podnl.as_mut(), &spec)
        .map_err(|e| io_err("cannot inspect the pod network", &e))?;
    drift.extend(live.0);
    if drift.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        Code::Drift,
        "container networking does not match ADD",
        drift.join("; "),
    ))
}

fn require_1_1(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    if conf.cni_version < Version::V1_1_0 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("{verb} is not supported by this cniVersion"),
            format!(
                "cniVersion {} predates {verb} (1.1.0)",
                conf.cni_version.as_str()
            ),
        ));
    }
    Ok(())
}

fn cmd_gc(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    require_1_1(&conf, "GC")?;
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::new(
            Code::InvalidConfig,
            "GC requires cni.dev/valid-attachments",
            "refusing to treat a missing list as empty",
        ));
    };
    let store = Store::lock(&conf.ipam_dir()).map_err(ipam_err)?;
    let mut state = store.load().map_err(ipam_err)?;
    let stale = state.gc(valid);
    if stale.is_empty() {
        return Ok(());
    }
    let mut host = Netlink::open().map_err(|e| io_err("cannot open netlink", &e))?;
    let mut released = 0usize;
    for a in stale {
        match pod::teardown(&mut host, &a.host_veth) {
            Ok(_) => released += 1,
            Err(e) => {
                // Keep the allocation: its address must not be reused while the veth may still
                // carry traffic. The next GC tries again.
                warn!(error = %e, veth = %a.host_veth, "GC: cannot delete veth; keeping its allocation");
                state
                    .allocations
                    .insert(crate::ipam::key(&a.container_id, &a.ifname), a);
            }
        }
    }
    store.save(&state).map_err(ipam_err)?;
    info!(released, "GC released stale attachments");
    Ok(())
}

fn cmd_status(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    require_1_1(&conf, "STATUS")?;
    let unavailable = |msg: &str, e: &(dyn std::error::Error + 'static)| {
        CniError::with_source(Code::NotAvailable, msg, e)
    };
    let node = NodeState::load(&conf.node_state_file)
        .map_err(|e| unavailable("no valid node state", &e))?;
    let pool =
        Pool::new(Some(&node), &conf.ipam).map_err(|e| unavailable("no address pool", &e))?;
    let state = crate::ipam::read_snapshot(&conf.ipam_dir())
        .map_err(|e| unavailable("IPAM store unusable", &e))?;
    let used = state.used();
    for fam in pool.families() {
        if pool.free(fam, &used) == 0 {
            return Err(CniError::new(
                Code::NotAvailable,
                "pod CIDR exhausted",
                format!(
                    "no free {fam} address in {}",
                    pool.subnet(fam).map(|s| s.to_string()).unwrap_or_default()
                ),
            ));
        }
    }
    if !netns::exists("/proc/self/ns/net") {
        return Err(CniError::new(
            Code::NotAvailable,
            "no network namespace support",
            "",
        ));
    }
    Ok(())
}
