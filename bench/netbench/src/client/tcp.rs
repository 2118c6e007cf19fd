//! TCP throughput: N streams for a duration, either direction; the receiver counts.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{Series, mbps, sample, session_id};
use crate::proto::{Message, TCP_RESULT_LEN};

#[derive(Debug, Clone)]
pub struct TcpOpts {
    pub server: SocketAddr,
    pub streams: u16,
    pub duration: Duration,
    pub reverse: bool,
    /// Bytes per write.
    pub len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpResult {
    pub server: String,
    pub direction: &'static str,
    pub streams: u16,
    pub duration_s: f64,
    /// Bytes the receiving end counted.
    pub bytes: u64,
    /// Receiver's goodput, Mbit/s.
    pub mbps: f64,
    pub per_stream_mbps: Vec<f64>,
    pub series: Series,
}

pub fn tcp(o: &TcpOpts) -> Result<TcpResult> {
    let session = session_id();
    let counter = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for i in 0..o.streams {
        let mut c = connect_tcp(o.server)?;
        let mut hello = Vec::new();
        Message::TcpHello {
            session,
            stream: i,
            reverse: o.reverse,
            duration_ms: o.duration.as_millis() as u32,
        }
        .encode(&mut hello, 0);
        c.write_all(&hello).context("sending the stream header")?;
        conns.push(c);
    }
    let start = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let counter = Arc::clone(&counter);
            let (dur, len, reverse) = (o.duration, o.len, o.reverse);
            std::thread::spawn(move || {
                if reverse {
                    tcp_receive(c, &counter)
                } else {
                    tcp_send(c, dur, len, &counter)
                }
            })
        })
        .collect();
    let series = sample(&counter, start, o.duration, "tcp");
    let mut per_stream = Vec::new();
    let (mut bytes, mut longest) = (0u64, 0u64);
    for h in handles {
        let (b, ns) = h
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        per_stream.push(mbps(b, ns));
        bytes += b;
        longest = longest.max(ns);
    }
    Ok(TcpResult {
        server: o.server.to_string(),
        direction: if o.reverse {
            "download (server → client)"
        } else {
            "upload (client → server)"
        },
        streams: o.streams,
        duration_s: longest as f64 / 1e9,
        bytes,
        mbps: mbps(bytes, longest),
        per_stream_mbps: per_stream,
        series,
    })
}

fn tcp_send(
    mut c: TcpStream,
    dur: Duration,
    len: usize,
    counter: &AtomicU64,
) -> Result<(u64, u64)> {
    let buf = vec![0x5au8; len];
    let end = Instant::now() + dur;
    while Instant::now() < end {
        let n = c.write(&buf).context("sending")?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    c.shutdown(Shutdown::Write)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut res = [0u8; TCP_RESULT_LEN];
    c.read_exact(&mut res)
        .context("reading the server's byte count")?;
    let msg = Message::decode(&res)?;
    let Message::TcpResult { bytes, elapsed_ns } = msg else {
        bail!("unexpected reply {msg:?}");
    };
    Ok((bytes, elapsed_ns))
}

fn tcp_receive(mut c: TcpStream, counter: &AtomicU64) -> Result<(u64, u64)> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = None;
    let mut bytes = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                bytes += n as u64;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    Ok((bytes, first.map_or(0, |f| f.elapsed().as_nanos() as u64)))
}

fn connect_tcp(addr: SocketAddr) -> Result<TcpStream> {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Err(e).with_context(|| {
            format!(
                "{addr} refused the connection: is `netbench server` running there, on port {}?",
                addr.port()
            )
        }),
        Err(e) if e.kind() == ErrorKind::TimedOut => {
            Err(e).with_context(|| format!("cannot reach {addr}: no answer within 3 s"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot reach {addr}")),
    }
}
