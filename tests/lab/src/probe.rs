//! A UDP probe stream between two lab namespaces (usually pods): one small datagram with a
//! sequence number every interval, recorded at the receiver. Outages show as gaps in the
//! received sequence numbers, which is what path failover tests and benchmarks measure.
//!
//! Each end is a thread that enters its namespace (`setns` moves only the calling thread)
//! and stays there, so no helper process is needed.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Bytes of each probe (sequence number first, then padding).
const PROBE_BYTES: usize = 64;

/// A running probe stream; [`ProbeStream::stop`] ends it and returns what arrived.
pub struct ProbeStream {
    interval: Duration,
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<u64>>>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

/// What a stream delivered.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub interval: Duration,
    /// Probes sent (sequence numbers `0..sent`).
    pub sent: u64,
    /// Sequence numbers received, in arrival order (duplicates included).
    pub received: Vec<u64>,
}

impl ProbeStream {
    /// Starts sending from namespace `from` to `dst:port` (an address in namespace `to`)
    /// every `interval`.
    pub fn start(
        from: &str,
        to: &str,
        dst: IpAddr,
        port: u16,
        interval: Duration,
    ) -> Result<ProbeStream> {
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let receiver = {
            let (to, stop, received) = (to.to_owned(), stop_recv.clone(), received.clone());
            std::thread::spawn(move || {
                let sock = match enter(&to).and_then(|()| {
                    let s = UdpSocket::bind(SocketAddr::new(dst, port))?;
                    s.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf)
                        && n >= 8
                    {
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(&buf[..8]);
                        received
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(u64::from_be_bytes(seq));
                    }
                }
            })
        };
        ready_rx
            .recv()
            .context("probe receiver thread died")?
            .with_context(|| format!("probe receiver in {to}"))?;
        let sender = {
            let (netns, stop, sent) = (from.to_owned(), stop_send.clone(), sent.clone());
            let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
            let h = std::thread::spawn(move || {
                let sock = match enter(&netns).and_then(|()| {
                    let any: IpAddr = if dst.is_ipv4() {
                        IpAddr::from([0u8; 4])
                    } else {
                        IpAddr::from([0u16; 8])
                    };
                    Ok(UdpSocket::bind(SocketAddr::new(any, 0))?)
                }) {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; PROBE_BYTES];
                let start = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    buf[..8].copy_from_slice(&seq.to_be_bytes());
                    // A send error (no route while a path is down) is a lost probe.
                    let _ = sock.send_to(&buf, SocketAddr::new(dst, port));
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                    // An absolute schedule: late wake-ups do not stretch the stream.
                    let next = start + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
            });
            rx.recv()
                .context("probe sender thread died")?
                .with_context(|| format!("probe sender in {from}"))?;
            h
        };
        Ok(ProbeStream {
            interval,
            stop_send,
            stop_recv,
            sent,
            received,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Probes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// A snapshot of what was received so far.
    pub fn report(&self) -> ProbeReport {
        ProbeReport {
            interval: self.interval,
            sent: self.sent(),
            received: self
                .received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    /// Stops the stream; probes still in flight get 300 ms to arrive.
    pub fn stop(mut self) -> ProbeReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop_send.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
            std::thread::sleep(Duration::from_millis(300));
        }
        self.stop_recv.store(true, Ordering::Relaxed);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        self.halt();
    }
}

impl ProbeReport {
    /// The longest run of lost probes, as time (run length × interval), counting a run that
    /// lasts to the end of the stream. Zero when nothing was lost.
    pub fn longest_gap(&self) -> Duration {
        self.gaps()
            .into_iter()
            .map(|(_, d)| d)
            .max()
            .unwrap_or_default()
    }

    /// True when probes arrived after the longest gap (the stream recovered).
    pub fn recovered(&self) -> bool {
        let Some((start, len)) = self.longest_run() else {
            return true;
        };
        start + len < self.sent
    }

    /// Fraction of the probes with sequence numbers in `range` that arrived (at least once).
    pub fn delivery(&self, range: std::ops::Range<u64>) -> f64 {
        let total = range.end.saturating_sub(range.start);
        if total == 0 {
            return 1.0;
        }
        let got = self.distinct().range(range).count();
        got as f64 / total as f64
    }

    /// Runs of lost probes: (first lost sequence number, duration).
    pub fn gaps(&self) -> Vec<(u64, Duration)> {
        self.runs()
            .into_iter()
            .map(|(s, n)| (s, self.interval * u32::try_from(n).unwrap_or(u32::MAX)))
            .collect()
    }

    fn distinct(&self) -> std::collections::BTreeSet<u64> {
        self.received
            .iter()
            .copied()
            .filter(|s| *s < self.sent)
            .collect()
    }

    fn longest_run(&self) -> Option<(u64, u64)> {
        self.runs().into_iter().max_by_key(|(_, n)| *n)
    }

    /// (first lost, how many) for every run of missing sequence numbers below `sent`.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut next = 0u64;
        for s in self.distinct() {
            if s > next {
                runs.push((next, s - next));
            }
            next = s + 1;
        }
        if self.sent > next {
            runs.push((next, self.sent - next));
        }
        runs
    }
}

/// Moves the calling thread into a named network namespace.
fn enter(netns: &str) -> Result<()> {
    let f = std::fs::File::open(crate::ns::path(netns))
        .with_context(|| format!("opening namespace {netns}"))?;
    // SAFETY: setns with a valid namespace fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "entering namespace {netns}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
