//! The local status API: a unix socket that answers each connection with a JSON document.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tracing::debug;

use crate::config::Config;
use crate::dataplane::Shared;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/mistnet/mistnetd.sock";

/// Static facts about the node for the status document.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub config: Config,
    pub mtu: u32,
    pub public_key: String,
}

/// Serves status requests until the process exits.
pub fn serve(
    path: &Path,
    shared: Arc<Shared>,
    facts: Arc<std::sync::RwLock<NodeFacts>>,
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
                let facts = facts
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let doc = status(&shared, &facts);
                if let Err(e) = conn.write_all(doc.to_string().as_bytes()) {
                    debug!(error = %e, "status client went away");
                }
            }
        })?;
    Ok(())
}

/// The status document.
pub fn status(shared: &Shared, facts: &NodeFacts) -> Value {
    let node = shared.node();
    let stats = node.stats();
    let peers: Vec<Value> = facts
        .config
        .peers
        .iter()
        .filter_map(|p| {
            let s = node.peer_status(&p.name)?;
            Some(json!({
                "name": p.name,
                "publicKey": crate::keys::encode(&s.public_key),
                "endpoint": s.endpoint.map(|e| e.to_string()),
                "allowedIps": s.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "latestHandshakeSecondsAgo": s.last_handshake.map(|d| d.as_secs()),
                "rxBytes": s.rx_bytes,
                "txBytes": s.tx_bytes,
                "spoofedDrops": s.spoofed,
                "up": s.up,
            }))
        })
        .collect();
    json!({
        "node": facts.config.node_name,
        "publicKey": facts.public_key,
        "interface": facts.config.interface,
        "listenPort": facts.config.listen_port,
        "mtu": facts.mtu,
        "podCidrs": facts.config.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tunnelAddresses": facts.config.tunnel_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "stats": {
            "txPackets": stats.tx_packets, "rxPackets": stats.rx_packets, "noRoute": stats.no_route,
            "unknownPeer": stats.unknown_peer, "spoofed": stats.spoofed, "cryptoErrors": stats.crypto_errors,
        },
        "peers": peers,
    })
}

/// Fetches the status document from a running daemon.
pub fn fetch(path: &Path) -> Result<Value> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("connecting to {} (is mistnetd running?)", path.display()))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    serde_json::from_str(&text).context("malformed status document")
}
