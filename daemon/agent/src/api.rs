//! The local API: a unix socket (mode 0600) taking one request line per connection.
//!
//! - `status` (or nothing): the status document as JSON.
//! - `metrics`: every metric in the Prometheus text format (see `metrics`).
//! - `delete-link <index> <name>`: the CNI plugin hands a pod veth's deletion to the daemon,
//!   whose deleter thread sits through the kernel's post-unregister wait (see
//!   `mistnet_cni::pod::teardown_via_daemon`). Only links named like pod veths are accepted.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tracing::debug;

use crate::config::Config;
use crate::core::Dest;
use crate::dataplane::Shared;

/// Pod veths deleted for the CNI plugin (exported in the status document).
static VETHS_DELETED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/mistnet/mistnetd.sock";

/// Static facts about the node for the status document.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub config: Config,
    pub mtu: u32,
    pub public_key: String,
}

/// Serves requests until the process exits.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    facts: Arc<std::sync::RwLock<NodeFacts>>,
    deleter: std::sync::mpsc::Sender<(u32, String)>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let request = read_request(&mut conn);
                let words: Vec<&str> = request.split_whitespace().collect();
                let snapshot = || {
                    let facts = facts
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    status(&shared, &facts)
                };
                let reply = match words.as_slice() {
                    [] | ["status"] => snapshot().to_string(),
                    ["metrics"] => crate::metrics::render(&snapshot()),
                    ["delete-link", index, name] => delete_link(&deleter, index, name),
                    _ => "error unknown request\n".to_owned(),
                };
                if let Err(e) = conn.write_all(reply.as_bytes()) {
                    debug!(error = %e, "API client went away");
                }
            }
        })?;
    Ok(())
}

fn delete_link(
    deleter: &std::sync::mpsc::Sender<(u32, String)>,
    index: &str,
    name: &str,
) -> String {
    let Ok(index) = index.parse::<u32>() else {
        return "error bad index\n".to_owned();
    };
    if !name.starts_with(mistnet_cni::pod::HOST_VETH_PREFIX) || name.len() > 15 {
        return "error not a pod veth\n".to_owned();
    }
    match deleter.send((index, name.to_owned())) {
        Ok(()) => "ok\n".to_owned(),
        Err(_) => "error deleter stopped\n".to_owned(),
    }
}

/// Reads one request line (bounded, with a timeout; a silent client gets the status).
fn read_request(conn: &mut UnixStream) -> String {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let mut buf = [0u8; 128];
    let mut len = 0;
    while len < buf.len() {
        match conn.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if buf[..len].contains(&b'\n') {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf[..len])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Deletes pod veths handed over by the CNI plugin, one at a time, each in this thread: the
/// kernel's post-unregister wait lands here instead of on the plugin's DEL.
pub fn spawn_deleter(overlay_interface: String) -> Result<std::sync::mpsc::Sender<(u32, String)>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Deletions waiting out the kernel at once; past this the dispatcher deletes inline, which
    /// slows the plugin down instead of growing threads without bound.
    const MAX_IN_FLIGHT: usize = 64;
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

    fn delete(nl: &mut mistnet_cni::netlink::Netlink, index: u32, name: &str) {
        // The index must still name the link the plugin asked about.
        match nl.link_by_name(name) {
            Ok(l) if l.header.index == index => match nl.delete_link(index) {
                Ok(()) => {
                    VETHS_DELETED.fetch_add(1, Ordering::Relaxed);
                    debug!(%name, "deleted pod veth for the CNI plugin");
                }
                Err(e) => debug!(%name, error = %e, "deleting pod veth"),
            },
            Ok(_) | Err(_) => debug!(%name, "pod veth already gone"),
        }
    }

    let (tx, rx) = std::sync::mpsc::channel::<(u32, String)>();
    let mut inline = mistnet_cni::netlink::Netlink::open().context("netlink for the deleter")?;
    std::thread::Builder::new()
        .name("deleter".into())
        .spawn(move || {
            for (index, name) in rx {
                if name == overlay_interface {
                    continue;
                }
                // One short-lived thread per deletion: the kernel's waits of concurrent DELs
                // overlap instead of queueing behind each other.
                if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) < MAX_IN_FLIGHT {
                    let spawned = std::thread::Builder::new()
                        .name("delete-veth".into())
                        .spawn({
                            let name = name.clone();
                            move || {
                                if let Ok(mut nl) = mistnet_cni::netlink::Netlink::open() {
                                    delete(&mut nl, index, &name);
                                }
                                IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
                            }
                        });
                    if spawned.is_ok() {
                        continue;
                    }
                }
                IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
                delete(&mut inline, index, &name);
            }
        })?;
    Ok(tx)
}

/// The status document.
pub fn status(shared: &Shared, facts: &NodeFacts) -> Value {
    let core = shared.core();
    let stats = core.overlay.stats();
    let port_of = |local: u8| facts.config.listen_ports.get(usize::from(local)).copied();
    let peers: Vec<Value> = core
        .peer_names()
        .filter_map(|name| {
            let id = core.id_of(name)?;
            let s = core.overlay.peer_status(&id)?;
            // Where datagrams actually go: the selector's choice, or the overlay's path.
            let endpoint = core.dests(id, s.path).first.map(|d| match d {
                Dest::Direct(p) => (p.remote.to_string(), port_of(p.local)),
                Dest::Relay { via, .. } => {
                    (format!("relay via {}", via.remote), port_of(via.local))
                }
            });
            let paths = core
                .paths
                .as_ref()
                .and_then(|sel| sel.status(&id))
                .map(|ps| {
                    json!({
                        "active": ps.active.as_ref().map(|p| core.describe(p)),
                        "secondary": ps.secondary.as_ref().map(|p| core.describe(p)),
                        "mode": ps.mode,
                        "reason": ps.reason.map(|r| r.as_str()),
                        "sinceChangeMs": ps.since_change.map(|d| d.as_millis() as u64),
                        "paths": ps.paths.iter().map(|p| json!({
                            "path": core.describe(&p.path),
                            "state": p.state,
                            "discovered": p.discovered,
                            "srttMs": p.srtt.map(|d| d.as_secs_f64() * 1e3),
                            "rttvarMs": p.rttvar.map(|d| d.as_secs_f64() * 1e3),
                            "jitterMs": p.jitter.as_secs_f64() * 1e3,
                            "lossPct": p.loss_pct,
                            "lossRxPct": p.loss_rx_pct,
                            "lossTxPct": p.loss_tx_pct,
                            "lastHeardMsAgo": p.last_heard_ago.map(|d| d.as_millis() as u64),
                            "score": p.score,
                            "cost": p.cost,
                            "probeBytesSent": p.probe_bytes_sent,
                        })).collect::<Vec<_>>(),
                    })
                });
            let (mode, wish, r, (missing, in_time, arrived)) = core.repair_status(id);
            let repair = json!({
                "mode": mode, "wish": wish, "nacks": r.nacks, "resent": r.resent,
                "missed": r.missed, "repairEntered": r.repair_entered,
                "evidence": {"missing": missing, "inTime": in_time, "arrived": arrived},
            });
            Some(json!({
                "name": name,
                "publicKey": crate::keys::encode(&s.public_key),
                "endpoint": endpoint.as_ref().map(|(e, _)| e.clone()),
                "localPort": endpoint.and_then(|(_, l)| l),
                "allowedIps": s.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "latestHandshakeSecondsAgo": s.last_handshake.map(|d| d.as_secs()),
                "rxBytes": s.rx_bytes,
                "txBytes": s.tx_bytes,
                "spoofedDrops": s.spoofed,
                "up": s.up,
                "paths": paths,
                "repair": repair,
            }))
        })
        .collect();
    let path_stats = core.paths.as_ref().map(|sel| sel.stats());
    let (nacks_sent, nack_bytes_sent) = core.nacks_sent();
    drop(core);
    let sync = crate::lock(&shared.sync_status).clone();
    json!({
        "node": facts.config.node_name,
        "publicKey": facts.public_key,
        "interface": facts.config.interface,
        "listenPort": facts.config.listen_port,
        "listenPorts": facts.config.listen_ports,
        "underlays": facts.config.underlays.iter().map(|u| json!({
            "interface": u.interface, "port": u.port, "cost": u.cost, "metered": u.metered,
        })).collect::<Vec<_>>(),
        "zone": facts.config.zone,
        "mtu": facts.mtu,
        "podCidrs": facts.config.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tunnelAddresses": facts.config.tunnel_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "stats": {
            "txPackets": stats.tx_packets, "rxPackets": stats.rx_packets, "noRoute": stats.no_route,
            "unknownPeer": stats.unknown_peer,
            "podVethsDeleted": VETHS_DELETED.load(std::sync::atomic::Ordering::Relaxed), "spoofed": stats.spoofed, "cryptoErrors": stats.crypto_errors,
        },
        "pathStats": path_stats,
        "nacksSent": nacks_sent,
        "nackBytesSent": nack_bytes_sent,
        "peers": peers,
        "sync": sync,
    })
}

/// Fetches the status document from a running daemon.
pub fn fetch(path: &Path) -> Result<Value> {
    let text = request(path, "status")?;
    serde_json::from_str(&text).context("malformed status document")
}

/// Sends one request to a running daemon and returns its answer.
pub fn request(path: &Path, what: &str) -> Result<String> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("connecting to {} (is mistnetd running?)", path.display()))?;
    conn.write_all(format!("{what}\n").as_bytes())?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}
