//! Control-channel cost of `mistnet-sync`, measured in simulation (no root, deterministic):
//! full-state size against Kubernetes JSON objects, bytes per change (as a delta and as a full
//! record), steady-state chatter, and recovery after a partition (300 ms RTT, 5% loss).
//!
//! The anchors carry the same information as a record: a custom resource per node, a minimal
//! v1 Node, and the custom resource as the API server serves it (lists and watch events), that
//! is with the `metadata.managedFields` entry every server-side apply leaves.
//!
//! Usage: `sync-bench [--json]`.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mistnet_sync::codec::{self, Message};
use mistnet_sync::sim::{NetConfig, Sim, Topology, sample_record, secret_of};
use mistnet_sync::{Config, LinkInfo, NodeRecord, Replica};
use serde_json::{Value, json};

const NODES: u32 = 1000;
const SIM_NODES: u32 = 100;

fn main() -> Result<()> {
    let mut as_json = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--json" => as_json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let t0 = Instant::now();
    let mut rows: Vec<(String, Value)> = Vec::new();

    // 1. Full state of 1000 nodes.
    let mut all = Replica::<u32>::new(
        Config::default(),
        secret_of(9, NODES),
        sample_record(NODES),
        [1; 32],
        t0,
    )
    .context("collector replica")?;
    let mut crd = 0usize;
    let mut served = 0usize;
    let mut node_json = 0usize;
    for i in 0..NODES {
        let r = Replica::<u32>::new(
            Config::default(),
            secret_of(9, i),
            sample_record(i),
            [2; 32],
            t0,
        )
        .with_context(|| format!("replica {i}"))?;
        all.import_state(&r.export_state(), t0).context("import")?;
        crd += serde_json::to_string(&crd_object(r.own()))?.len();
        served += serde_json::to_string(&served_object(r.own()))?.len();
        node_json += serde_json::to_string(&node_object(r.own()))?.len();
    }
    let own_id = all.identity();
    let recs: Vec<Vec<u8>> = codec::decode_state(&all.export_state())
        .context("decode state")?
        .into_iter()
        .filter(|r| codec::decode_signed(r).is_ok_and(|(rec, ..)| rec.identity != own_id))
        .collect();
    let raw: usize = recs.iter().map(|r| r.len() + 2).sum::<usize>() + 5;
    let zstd = codec::encode_state(recs.iter().map(Vec::as_slice)).len();
    rows.push((
        "full state, 1000 nodes".into(),
        json!({
            "ours_raw_bytes": raw, "ours_zstd_bytes": zstd,
            "crd_json_bytes": crd, "served_crd_json_bytes": served, "node_json_bytes": node_json,
            "ratio_vs_crd": zstd as f64 / crd as f64,
            "ratio_vs_served_crd": zstd as f64 / served as f64,
            "ratio_vs_node": zstd as f64 / node_json as f64,
        }),
    ));

    // 2. One change.
    let mut a = Replica::<u32>::new(
        Config::default(),
        secret_of(9, 1),
        sample_record(1),
        [3; 32],
        t0,
    )?;
    a.add_peer(
        2,
        LinkInfo {
            cost: 10,
            budget_bytes_per_sec: None,
        },
    );
    while a.poll_transmit().is_some() {}
    a.update_own(|r| r.endpoints[0].addr.set_port(51821), t0)?;
    // A peer holding the previous version gets the push as a delta ...
    let pushed = a.poll_transmit().context("pushed delta")?.payload;
    if !matches!(Message::decode(&pushed), Ok(Message::Delta(_))) {
        bail!("the push of an own change is not a delta");
    }
    let delta = pushed.len();
    // ... one that does not asks for the record and gets it whole.
    let short = u64::from_be_bytes(a.identity()[..8].try_into()?);
    a.handle_message(2, &Message::Request(vec![(short, 0)]).encode(), t0)?;
    let full = a.poll_transmit().context("full record")?.payload.len();
    let watch_event =
        serde_json::to_string(&json!({"type": "MODIFIED", "object": crd_object(a.own())}))?.len();
    let served_event =
        serde_json::to_string(&json!({"type": "MODIFIED", "object": served_object(a.own())}))?
            .len();
    rows.push((
        "one record update".into(),
        json!({
            "delta_bytes": delta, "full_record_bytes": full,
            "watch_event_json_bytes": watch_event, "served_watch_event_json_bytes": served_event,
            "delta_ratio_vs_crd": delta as f64 / watch_event as f64,
            "delta_ratio_vs_served_crd": delta as f64 / served_event as f64,
            "full_ratio_vs_crd": full as f64 / watch_event as f64,
            "full_ratio_vs_served_crd": full as f64 / served_event as f64,
        }),
    ));

    // 3. Steady state.
    let mut sim = Sim::new(
        SIM_NODES,
        Topology::FullMesh,
        Config::default(),
        NetConfig::default(),
        t0,
    );
    let conv = sim
        .run_until(
            t0 + Duration::from_secs(120),
            Duration::from_millis(100),
            Sim::converged,
        )
        .context("initial convergence")?;
    let initial_bytes = sim.bytes;
    sim.run_for(Duration::from_secs(60));
    let before = sim.bytes;
    let secs = 600u64;
    sim.run_for(Duration::from_secs(secs));
    let steady = (sim.bytes - before) as f64 / f64::from(SIM_NODES) / secs as f64;
    rows.push((
        "cold start, 100 nodes".into(),
        json!({"converge_s": (conv - t0).as_secs_f64(), "bytes_per_node": initial_bytes / u64::from(SIM_NODES)}),
    ));
    rows.push((
        "steady state, 100 nodes, 10 min".into(),
        json!({"bytes_per_node_per_s": steady}),
    ));

    // 4. Partition heal.
    sim.partition(|i| u8::from(i >= SIM_NODES / 2));
    for i in [1u32, 2, 3, 4, 5, 60, 61, 62, 63, 64] {
        sim.with(i, |r, now| {
            r.update_own(|rec| rec.zone = format!("moved-{i}"), now)
        })
        .context("node")??;
    }
    sim.run_for(Duration::from_secs(60));
    sim.heal();
    let healed = sim.now;
    let before = sim.bytes;
    let at = sim
        .run_until(
            healed + Duration::from_secs(300),
            Duration::from_millis(50),
            Sim::converged,
        )
        .context("converge after heal")?;
    rows.push((
        "partition heal, 100 nodes, 10 changes".into(),
        json!({"converge_s": (at - healed).as_secs_f64(), "total_bytes": sim.bytes - before}),
    ));

    // 5. 1000 nodes cold start (random peer graph, degree ~16).
    let mut big = Sim::new(
        NODES,
        Topology::Random(8),
        Config::default(),
        NetConfig::default(),
        t0,
    );
    let at = big
        .run_until(
            t0 + Duration::from_secs(300),
            Duration::from_millis(500),
            Sim::converged,
        )
        .context("1000-node convergence")?;
    rows.push((
        "cold start, 1000 nodes".into(),
        json!({"converge_s": (at - t0).as_secs_f64(), "bytes_per_node": big.bytes / u64::from(NODES)}),
    ));

    if as_json {
        let obj: serde_json::Map<String, Value> = rows.into_iter().collect();
        println!("{}", serde_json::to_string_pretty(&obj)?);
    } else {
        println!("| measurement | values |\n|---|---|");
        for (k, v) in rows {
            let vals: Vec<String> = v
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={}", fmt(v))).collect())
                .unwrap_or_default();
            println!("| {k} | {} |", vals.join(", "));
        }
    }
    Ok(())
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => format!("{f:.3}"),
        Some(_) | None => v.to_string(),
    }
}

fn b64(k: &[u8; 32]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in k.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A Kilo/CiliumNode-like custom resource carrying the same information (the WireGuard key is
/// the node's one key, so no identity annotation).
fn crd_object(r: &NodeRecord) -> Value {
    json!({
        "apiVersion": "mistnet.io/v1alpha1",
        "kind": "MistNode",
        "metadata": {
            "name": r.name,
            "uid": format!("6f1c2d3e-{:04x}-4a5b-8c9d-0e1f2a3b4c5d", r.version),
            "resourceVersion": "48213977",
            "generation": r.version,
            "creationTimestamp": "2025-01-14T09:12:44Z",
            "labels": {"topology.kubernetes.io/zone": r.zone, "kubernetes.io/hostname": r.name},
        },
        "spec": {
            "wireguardPublicKey": b64(&r.wg_key),
            "endpoints": r.endpoints.iter().map(|e| json!({"interface": e.iface, "address": e.addr.to_string(), "cost": e.cost})).collect::<Vec<_>>(),
            "podCIDRs": r.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tunnelAddresses": r.tunnel_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "zone": r.zone,
            "version": r.version,
            "signature": b64(&[0x5a; 32]) + &b64(&[0xa5; 32]),
        },
    })
}

/// The custom resource as the API server serves it in lists and watch events: an object written
/// by server-side apply (field manager `mistnetd`) carries the manager's entry in
/// `metadata.managedFields`, listing every field it owns.
fn served_object(r: &NodeRecord) -> Value {
    let mut obj = crd_object(r);
    obj["metadata"]["managedFields"] = json!([{
        "manager": "mistnetd",
        "operation": "Apply",
        "apiVersion": "mistnet.io/v1alpha1",
        "time": "2026-12-03T09:12:44Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {
                "f:labels": {"f:kubernetes.io/hostname": {}, "f:topology.kubernetes.io/zone": {}},
            },
            "f:spec": {
                "f:endpoints": {}, "f:podCIDRs": {}, "f:signature": {}, "f:tunnelAddresses": {},
                "f:version": {}, "f:wireguardPublicKey": {}, "f:zone": {},
            },
        },
    }]);
    obj
}

/// A v1 Node with only the fields that carry the same information (as Kilo annotates nodes).
fn node_object(r: &NodeRecord) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": r.name,
            "labels": {"topology.kubernetes.io/zone": r.zone},
            "annotations": {
                "mistnet.io/wireguard-key": b64(&r.wg_key),
                "mistnet.io/endpoints": r.endpoints.iter().map(|e| format!("{}={}:{}", e.iface, e.addr, e.cost)).collect::<Vec<_>>().join(","),
                "mistnet.io/tunnel": r.tunnel_addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            },
        },
        "spec": {"podCIDRs": r.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>()},
        "status": {"addresses": r.endpoints.iter().map(|e| json!({"type": "InternalIP", "address": e.addr.ip().to_string()})).collect::<Vec<_>>()},
    })
}
