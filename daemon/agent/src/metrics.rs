//! Every metric mistnetd exports, defined once, rendered in the Prometheus text format by the
//! local API (`mistnetd metrics`). One prefix per area: `overlay_`, `pathsel_`, `sync_`.
//!
//! The cores keep plain counter structs; this module only reads them. Per-path and per-peer
//! gauges carry `peer` and `path` labels (names, never keys or pod addresses).

use std::fmt::Write;

use serde_json::Value;

/// One metric: name, kind, unit (in the name where Prometheus wants it) and help text.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

const OVERLAY: &[(&str, Metric)] = &[
    (
        "txPackets",
        Metric {
            name: "overlay_tx_packets_total",
            kind: "counter",
            help: "Packets encrypted and sent to peers.",
        },
    ),
    (
        "rxPackets",
        Metric {
            name: "overlay_rx_packets_total",
            kind: "counter",
            help: "Packets received from peers and written to the overlay device.",
        },
    ),
    (
        "noRoute",
        Metric {
            name: "overlay_no_route_total",
            kind: "counter",
            help: "Packets for destinations no peer owns.",
        },
    ),
    (
        "unknownPeer",
        Metric {
            name: "overlay_unknown_peer_total",
            kind: "counter",
            help: "Datagrams from unknown keys or sessions.",
        },
    ),
    (
        "spoofed",
        Metric {
            name: "overlay_spoofed_total",
            kind: "counter",
            help: "Packets dropped for an inner source outside the peer's allowed IPs.",
        },
    ),
    (
        "cryptoErrors",
        Metric {
            name: "overlay_crypto_errors_total",
            kind: "counter",
            help: "Datagrams failing decryption, replay or handshake checks.",
        },
    ),
];

/// The Prometheus text of a status document (see `api::status`).
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    for (field, m) in OVERLAY {
        header(&mut out, m.name, m.kind, m.help);
        let _ = writeln!(out, "{} {}", m.name, num(&status["stats"][field]));
    }
    render_paths(&mut out, status);
    render_sync(&mut out, &status["sync"]);
    out
}

fn render_paths(out: &mut String, status: &Value) {
    // Node-wide selector counters: every field of `mistnet_path::Stats`.
    if let Some(stats) = status["pathStats"].as_object() {
        for (field, v) in stats {
            let name = format!("pathsel_{field}_total");
            header(
                out,
                &name,
                "counter",
                "Path selector counter (see mistnet_path::Stats).",
            );
            let _ = writeln!(out, "{name} {}", num(v));
        }
    }
    header(
        out,
        "pathsel_nacks_sent_total",
        "counter",
        "Nacks sent: requests to resend data lost on the active path (redundant mode).",
    );
    let _ = writeln!(
        out,
        "pathsel_nacks_sent_total {}",
        num(&status["nacksSent"])
    );
    header(
        out,
        "pathsel_nack_bytes_sent_total",
        "counter",
        "Wire bytes of the nacks sent (each is sent on both of the peer's paths).",
    );
    let _ = writeln!(
        out,
        "pathsel_nack_bytes_sent_total {}",
        num(&status["nackBytesSent"])
    );
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    /// A per-peer value read from the peer's status.
    type PeerValue = fn(&Value) -> u64;
    let per_peer: [(Metric, PeerValue); 3] = [
        (
            Metric {
                name: "pathsel_repairing",
                kind: "gauge",
                help: "1 while only lost packets are resent on the second path instead of copying all.",
            },
            |p| u64::from(p["repair"]["mode"].as_str() == Some("repair")),
        ),
        (
            Metric {
                name: "pathsel_repair_resent_total",
                kind: "counter",
                help: "Data messages resent on the second path at the peer's request.",
            },
            |p| p["repair"]["resent"].as_u64().unwrap_or(0),
        ),
        (
            Metric {
                name: "pathsel_redundant",
                kind: "gauge",
                help: "1 while the peer's packets are sent on two paths.",
            },
            |p| u64::from(p["paths"]["mode"].as_str() == Some("redundant")),
        ),
    ];
    for (m, value) in per_peer {
        header(out, m.name, m.kind, m.help);
        for p in &peers {
            let _ = writeln!(
                out,
                "{}{{peer=\"{}\"}} {}",
                m.name,
                label(&p["name"]),
                value(p)
            );
        }
    }
    let gauges = [
        (
            "pathsel_path_up",
            "1 while the path answers probes.",
            "state",
        ),
        (
            "pathsel_path_active",
            "1 for the path carrying the peer's traffic.",
            "active",
        ),
        (
            "pathsel_path_srtt_seconds",
            "Smoothed round-trip time.",
            "srttMs",
        ),
        (
            "pathsel_path_jitter_seconds",
            "Round-trip jitter.",
            "jitterMs",
        ),
        (
            "pathsel_path_loss_ratio",
            "Probe loss over the window.",
            "lossPct",
        ),
        (
            "pathsel_path_probe_bytes_total",
            "Probe bytes sent on the path.",
            "probeBytesSent",
        ),
    ];
    for (name, help, field) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        header(out, name, kind, help);
        for p in &peers {
            let active = p["paths"]["active"].as_str();
            for path in p["paths"]["paths"].as_array().into_iter().flatten() {
                let value = match field {
                    "state" => f64::from(u8::from(path["state"].as_str() == Some("up"))),
                    "active" => f64::from(u8::from(path["path"].as_str() == active)),
                    "srttMs" | "jitterMs" => path[field].as_f64().map_or(f64::NAN, |v| v / 1e3),
                    "lossPct" => path[field].as_f64().map_or(f64::NAN, |v| v / 100.0),
                    _ => path[field].as_f64().unwrap_or(0.0),
                };
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{}\",path=\"{}\"}} {value}",
                    label(&p["name"]),
                    label(&path["path"])
                );
            }
        }
    }
}

fn render_sync(out: &mut String, sync: &Value) {
    if sync.is_null() {
        return;
    }
    header(
        out,
        "sync_records",
        "gauge",
        "Live node records known, own included.",
    );
    let _ = writeln!(out, "sync_records {}", num(&sync["records"]));
    header(out, "sync_tombstones", "gauge", "Deleted nodes remembered.");
    let _ = writeln!(out, "sync_tombstones {}", num(&sync["tombstones"]));
    header(
        out,
        "sync_state_bytes",
        "gauge",
        "Size of the encoded, compressed cluster state.",
    );
    let _ = writeln!(out, "sync_state_bytes {}", num(&sync["state_bytes"]));
    let stats = &sync["stats"];
    for (field, name, help) in [
        (
            "tx_bytes",
            "sync_tx_bytes_total",
            "Control channel bytes sent, by message type.",
        ),
        (
            "rx_bytes",
            "sync_rx_bytes_total",
            "Control channel bytes received, by message type.",
        ),
        (
            "tx_messages",
            "sync_tx_messages_total",
            "Control channel messages sent, by type.",
        ),
        (
            "rx_messages",
            "sync_rx_messages_total",
            "Control channel messages received, by type.",
        ),
    ] {
        header(out, name, "counter", help);
        for (kind, v) in stats[field].as_object().into_iter().flatten() {
            let _ = writeln!(out, "{name}{{type=\"{kind}\"}} {}", num(v));
        }
    }
    for (field, name, help) in [
        (
            "deltas_applied",
            "sync_deltas_applied_total",
            "Field deltas applied onto a record held at their base version.",
        ),
        (
            "deltas_no_base",
            "sync_deltas_no_base_total",
            "Field deltas whose base version was not held (the full record is requested).",
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", num(&stats[field]));
    }
    header(
        out,
        "sync_rejected_total",
        "counter",
        "Records rejected, by reason.",
    );
    for (reason, v) in stats["rejected"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "sync_rejected_total{{reason=\"{reason}\"}} {}", num(v));
    }
    header(
        out,
        "sync_peer_last_sync_seconds",
        "gauge",
        "Time since the last exchange that found a peer in sync (sync lag).",
    );
    for p in sync["peers"].as_array().into_iter().flatten() {
        if let Some(ms) = p["last_sync_ms_ago"].as_f64() {
            let _ = writeln!(
                out,
                "sync_peer_last_sync_seconds{{peer=\"{}\"}} {}",
                label(&p["peer"]),
                ms / 1e3
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "0".to_owned(), |x| x.to_string())
}

/// A label value with Prometheus' escapes.
fn label(v: &Value) -> String {
    v.as_str()
        .unwrap_or("")
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_area_with_labels() {
        let status = serde_json::json!({
            "stats": {"txPackets": 3, "rxPackets": 4},
            "pathStats": {"switches": 2},
            "nacksSent": 7,
            "peers": [{"name": "n2", "repair": {"mode": "repair", "resent": 9}, "paths": {"active": "wlan0 -> 10.99.0.2:51820", "mode": "redundant",
                "paths": [{"path": "wlan0 -> 10.99.0.2:51820", "state": "up", "srttMs": 12.0, "lossPct": 5.0}]}}],
            "sync": {"records": 3, "stats": {"tx_bytes": {"digest": 10}, "rejected": {"bad_signature": 1}, "deltas_applied": 4},
                "peers": [{"peer": "n2", "last_sync_ms_ago": 1500}]},
        });
        let text = render(&status);
        assert!(text.contains("overlay_tx_packets_total 3\n"), "{text}");
        assert!(text.contains("pathsel_switches_total 2\n"), "{text}");
        assert!(text.contains("pathsel_nacks_sent_total 7\n"), "{text}");
        assert!(
            text.contains("pathsel_repairing{peer=\"n2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pathsel_repair_resent_total{peer=\"n2\"} 9\n"),
            "{text}"
        );
        assert!(
            text.contains("pathsel_redundant{peer=\"n2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pathsel_path_active{peer=\"n2\",path=\"wlan0 -> 10.99.0.2:51820\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "pathsel_path_srtt_seconds{peer=\"n2\",path=\"wlan0 -> 10.99.0.2:51820\"} 0.012\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "pathsel_path_loss_ratio{peer=\"n2\",path=\"wlan0 -> 10.99.0.2:51820\"} 0.05\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("sync_tx_bytes_total{type=\"digest\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains("sync_deltas_applied_total 4\n")
                && text.contains("sync_rejected_total{reason=\"bad_signature\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sync_peer_last_sync_seconds{peer=\"n2\"} 1.5\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE overlay_tx_packets_total counter")
                .count(),
            1
        );
    }
}
