//! Human tables and SVG plots of results.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::client::{PmtuResult, RrulResult, RttResult, Series, TcpResult, UdpResult};
use crate::emulate::LinkStats;
use crate::stats::LatencySummary;

pub fn tcp_table(r: &TcpResult) -> String {
    let mut s = format!(
        "TCP {} to {}, {} stream(s), {:.2} s\n",
        r.direction, r.server, r.streams, r.duration_s
    );
    for (i, m) in r.per_stream_mbps.iter().enumerate() {
        let _ = writeln!(s, "  stream {i:<3} {m:>10.2} Mbit/s");
    }
    let _ = writeln!(
        s,
        "  total      {:>10.2} Mbit/s  ({} bytes received)",
        r.mbps, r.bytes
    );
    s
}

pub fn udp_table(r: &UdpResult) -> String {
    format!(
        "UDP to {} at {:.2} Mbit/s, {}-byte packets\n  sent {:>10}   received {:>10}   lost {} ({:.3} %)\n  duplicates {}   reordered {}   jitter (RFC 3550) {:.1} µs\n  received goodput {:.2} Mbit/s\n",
        r.server,
        r.target_mbps,
        r.packet_bytes,
        r.sent,
        r.received,
        r.lost,
        r.loss_pct,
        r.duplicates,
        r.reordered,
        r.jitter_us,
        r.received_mbps
    )
}

pub fn latency_rows(l: &LatencySummary) -> String {
    format!(
        "  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  (ms)\n  {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
        "min",
        "mean",
        "median",
        "p90",
        "p99",
        "max",
        "jitter",
        l.min_us / 1e3,
        l.mean_us / 1e3,
        l.median_us / 1e3,
        l.p90_us / 1e3,
        l.p99_us / 1e3,
        l.max_us / 1e3,
        l.ipdv_us / 1e3
    )
}

pub fn rtt_table(r: &RttResult) -> String {
    let mut s = format!(
        "RTT to {}, {}-byte probes every {:.1} ms\n",
        r.server, r.packet_bytes, r.interval_ms
    );
    s += &latency_rows(&r.rtt);
    let _ = writeln!(
        s,
        "  sent {}  received {}  loss {:.2} % (up {}, down {})  duplicates {}  reordered {}",
        r.sent, r.received, r.loss_pct, r.lost_up, r.lost_down, r.duplicates, r.reordered
    );
    s
}

pub fn rrul_table(r: &RrulResult) -> String {
    let mut s = format!("Latency under load (RRUL) to {}\n idle:\n", r.server);
    s += &latency_rows(&r.idle.rtt);
    s += " loaded:\n";
    s += &latency_rows(&r.loaded.rtt);
    let _ = writeln!(
        s,
        "  upload {:.2} Mbit/s  download {:.2} Mbit/s  added latency (median) {:.2} ms  loaded loss {:.2} %",
        r.upload.mbps, r.download.mbps, r.added_latency_ms, r.loaded.loss_pct
    );
    s
}

pub fn pmtu_table(r: &PmtuResult) -> String {
    format!(
        "Path MTU to {}: {} bytes (local route MTU {}, {} probes)\n",
        r.server, r.pmtu, r.local_mtu, r.probes
    )
}

pub fn stats_table(stats: &[LinkStats]) -> String {
    let mut s = format!(
        "{:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  settings\n",
        "link", "forwarded", "dup", "down", "mtu", "loss", "queue", "queued"
    );
    for l in stats {
        let c = &l.counters;
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {}",
            l.link,
            c.forwarded,
            c.duplicated,
            c.dropped_down,
            c.dropped_mtu,
            c.dropped_loss,
            c.dropped_queue,
            l.queued,
            l.settings
        );
    }
    s
}

/// Writes an SVG with up to two panels: latency distribution and throughput over time.
pub fn plot(
    path: &Path,
    title: &str,
    latency: Option<&[(f64, u64)]>,
    series: &[(&str, &Series)],
) -> Result<()> {
    let panels =
        usize::from(latency.is_some_and(|b| !b.is_empty())) + usize::from(!series.is_empty());
    let root = SVGBackend::new(path, (900, 360 * panels.max(1) as u32)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.max(1), 1));
        let mut i = 0;
        if let Some(b) = latency.filter(|b| !b.is_empty()) {
            let xmax = b.iter().map(|x| x.0).fold(0.0, f64::max) / 1e3;
            let ymax = b.iter().map(|x| x.1).max().unwrap_or(1) as f64;
            let mut c = ChartBuilder::on(&areas[i])
                .caption(format!("{title}: RTT distribution"), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..xmax * 1.05, 0.0..ymax * 1.1)?;
            c.configure_mesh()
                .x_desc("RTT (ms)")
                .y_desc("probes")
                .draw()?;
            let step = if b.len() > 1 {
                (b[1].0 - b[0].0) / 1e3
            } else {
                xmax / 20.0
            };
            c.draw_series(b.iter().map(|(x, n)| {
                let x1 = x / 1e3;
                Rectangle::new([(x1 - step, 0.0), (x1, *n as f64)], BLUE.filled())
            }))?;
            i += 1;
        }
        if !series.is_empty() {
            let tmax = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.0))
                .fold(1.0, f64::max);
            let ymax = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.1))
                .fold(1.0, f64::max);
            let mut c = ChartBuilder::on(&areas[i])
                .caption(format!("{title}: throughput"), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..tmax, 0.0..ymax * 1.1)?;
            c.configure_mesh()
                .x_desc("time (s)")
                .y_desc("Mbit/s")
                .draw()?;
            for (k, (name, s)) in series.iter().enumerate() {
                let color = Palette99::pick(k).to_rgba();
                c.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing plot {}", path.display()))
}
