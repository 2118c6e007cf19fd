//! The I/O shell around the overlay core: TUN and UDP worker threads and the timer thread.
//!
//! - UDP workers read up to [`BATCH`] datagrams per `recvmmsg`, run them all through the core
//!   in one critical section, then write the packets to the TUN device.
//! - TUN workers drain up to [`BATCH`] packets from the (non-blocking) TUN device, encrypt
//!   them in one critical section, then send them with one `sendmmsg` per run of datagrams
//!   leaving on the same socket.
//! - The core sits behind one mutex held only while it runs (encrypt, decrypt, bookkeeping):
//!   never across a syscall. Each worker owns its buffers, allocated once, so the hot paths
//!   allocate nothing. Datagrams the core queues (handshake replies, keepalives, flushed
//!   queues) are drained in the same critical section and sent after the lock is released.
//! - Several underlay sockets (one per listen port): a path's local end is the socket's index
//!   ([`SockId`]); replies leave on the socket the peer was last heard on.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mistnet_overlay::{Decap, Encap, MIN_BUFFER, Path};
use mistnet_path::{Handled, PathId, wire};
use tracing::{debug, info, trace, warn};

use crate::core::{Core, Dest, PeerId};
use crate::reorder::{self, Verdict};

/// Socket buffer size asked for (as root, past rmem_max): tunnel loss under load was the
/// receiving socket's buffer overflowing (DESIGN.md §10).
const SOCKET_BUFFER: i32 = 8 << 20;
/// Datagrams or packets handled per syscall and per critical section.
pub const BATCH: usize = 16;
/// Bytes per batch slot: the largest datagram or IP packet (plus WireGuard's overhead).
const SLOT: usize = MIN_BUFFER;
/// Longest sleep of the timer thread: new deadlines set by the workers (a path in doubt
/// probed faster) are picked up within this.
const MAX_TIMER_SLEEP: Duration = Duration::from_millis(10);
/// Most addresses peers report for us that are kept (NAT mappings).
const MAX_OBSERVED: usize = 4;

/// Index of an underlay socket in [`Shared::socks`]: the local end of a path.
pub type SockId = u8;

/// A datagram to send after the core's lock is released.
type Pending = (Dest, Vec<u8>);

/// A packet to write to the TUN device: in a batch slot, or released from a reorder buffer.
enum Write {
    Slot(usize, usize),
    Owned(Vec<u8>),
}

/// State shared by the threads.
pub struct Shared {
    pub core: Mutex<Core>,
    pub socks: Vec<UdpSocket>,
    pub tun: tun_rs::SyncDevice,
    pub stopping: AtomicBool,
    /// Addresses peers observe for this node (its NAT mappings), published by the control
    /// channel.
    pub observed: Mutex<BTreeSet<SocketAddr>>,
    /// The control channel's last status snapshot.
    pub sync_status: Mutex<Option<serde_json::Value>>,
}

impl Shared {
    /// Locks the cores; a poisoned lock (a panicked worker) is taken over, as the cores' state
    /// stays consistent between calls.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        crate::lock(&self.core)
    }

    fn send(&self, path: Path<SockId>, datagram: &[u8]) {
        let Some(sock) = self.socks.get(usize::from(path.local)) else {
            return;
        };
        if let Err(e) = sock.send_to(datagram, v6_mapped(path.remote)) {
            trace!(dst = %path.remote, error = %e, "send failed");
        }
    }

    /// Sends one datagram to a destination, wrapping it for a relay if need be.
    fn send_to_dest(&self, dest: &Dest, my_id: &[u8; 8], datagram: &[u8], scratch: &mut Vec<u8>) {
        match dest {
            Dest::Direct(path) => self.send(*path, datagram),
            Dest::Relay {
                via,
                relay_key,
                dst,
            } => {
                wire::relay_to(dst, my_id, relay_key, datagram, scratch);
                self.send(*via, scratch);
            }
        }
    }

    fn send_pending(&self, pending: &mut Vec<Pending>, my_id: &[u8; 8], scratch: &mut Vec<u8>) {
        for (dest, payload) in pending.drain(..) {
            self.send_to_dest(&dest, my_id, &payload, scratch);
        }
    }
}

/// Moves what the cores queued (overlay handshakes and keepalives, path probes) into
/// `pending`, each to the destinations the selector chose. `replies`: the overlay's
/// transmits answer datagrams just received (handshake responses, flushed queues), so they
/// also go back on the path the datagram came in on, as WireGuard does: a peer that just
/// restarted is reached there even while the selector still holds another path (a relay
/// chosen while the peer was away).
fn drain_transmits(core: &mut Core, pending: &mut Vec<Pending>, replies: bool) {
    while let Some(t) = core.overlay.poll_transmit() {
        let d = core.dests(t.peer, Some(t.path));
        let back = Dest::Direct(t.path);
        // Port 0: the datagram came through a relay (see `handle_path_message`).
        if replies && t.path.remote.port() != 0 && d.first != Some(back) && d.second != Some(back) {
            pending.push((back, t.payload.clone()));
        }
        if let Some(second) = d.second {
            pending.push((second, t.payload.clone()));
        }
        if let Some(first) = d.first {
            pending.push((first, t.payload));
        }
    }
    while let Some(t) = core.paths.as_mut().and_then(|s| s.poll_transmit()) {
        if let Some(dest) = core.resolve(t.peer, &t.path) {
            pending.push((dest, t.payload));
        }
    }
}

/// Opens a dual-stack UDP socket with large buffers, bound to `interface` if given (so its
/// datagrams leave through that underlay whatever the routing table says).
pub fn bind_udp(port: u16, interface: Option<&str>) -> Result<UdpSocket> {
    let sock = match interface {
        None => UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
            .with_context(|| format!("binding UDP port {port}"))?,
        Some(name) => bind_to_device(port, name)
            .with_context(|| format!("binding UDP port {port} on {name}"))?,
    };
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a valid int option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            debug!(error = %std::io::Error::last_os_error(), "cannot force socket buffer size");
        }
    }
    Ok(sock)
}

/// A dual-stack UDP socket bound to one device before `bind`, so several underlays can share
/// a port (the kernel keeps sockets bound to different devices apart).
fn bind_to_device(port: u16, name: &str) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket; ownership passes to UdpSocket right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt with valid option values on our socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the name's bytes are valid for the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            libc::socklen_t::try_from(name.len()).unwrap_or(0),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let addr = sockaddr_v6(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    // SAFETY: addr is a valid sockaddr_in6 of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// Starts the workers and the timer thread.
pub fn spawn(shared: &Arc<Shared>, workers: usize) -> Result<Vec<std::thread::JoinHandle<()>>> {
    shared
        .tun
        .set_nonblocking(true)
        .context("making the TUN device non-blocking")?;
    let mut handles = Vec::new();
    for i in 0..workers {
        let sh = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("tun-{i}"))
                .spawn(move || tun_loop(&sh))?,
        );
        for s in 0..shared.socks.len() {
            let sh = shared.clone();
            let id = SockId::try_from(s).context("too many sockets")?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("udp-{s}-{i}"))
                    .spawn(move || udp_loop(&sh, id))?,
            );
        }
    }
    let sh = shared.clone();
    handles.push(
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || timer_loop(&sh))?,
    );
    Ok(handles)
}

/// A datagram to send: where, from which slot of the output buffer.
#[derive(Clone, Copy)]
struct Out {
    path: Path<SockId>,
    offset: usize,
    len: usize,
}

fn tun_loop(sh: &Shared) {
    let mut pkts = vec![0u8; BATCH * SLOT];
    let mut lens = [0usize; BATCH];
    let mut out = vec![0u8; BATCH * SLOT];
    let mut sends: Vec<Out> = Vec::with_capacity(2 * BATCH);
    let mut pending: Vec<Pending> = Vec::new();
    let mut scratch = Vec::with_capacity(SLOT);
    let mut mmsg = SendBatch::new();
    while !sh.stopping.load(Ordering::Relaxed) {
        let mut n = 0;
        while n < BATCH {
            match sh.tun.recv(&mut pkts[n * SLOT..(n + 1) * SLOT]) {
                Ok(len) => {
                    lens[n] = len;
                    n += 1;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    if !sh.stopping.load(Ordering::Relaxed) {
                        warn!(error = %e, "TUN read failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    break;
                }
            }
        }
        if n == 0 {
            wait_readable(sh.tun.as_raw_fd(), 100);
            continue;
        }
        let my_id = {
            let mut core = sh.core();
            let now = Instant::now();
            let mut last_peer: Option<PeerId> = None;
            for (i, len) in lens.iter().enumerate().take(n) {
                let slot = &mut out[i * SLOT..(i + 1) * SLOT];
                let base = slot.as_ptr() as usize;
                let Encap::Send {
                    peer,
                    path,
                    datagram,
                } = core
                    .overlay
                    .handle_tun_packet(&pkts[i * SLOT..i * SLOT + len], slot, now)
                else {
                    continue;
                };
                let offset = i * SLOT + (datagram.as_ptr() as usize - base);
                let dests = core.data_dests(peer, Some(path), datagram, now);
                for dest in [dests.first, dests.second].into_iter().flatten() {
                    match dest {
                        Dest::Direct(path) => sends.push(Out {
                            path,
                            offset,
                            len: datagram.len(),
                        }),
                        // Relayed packets are rare (no direct path works): a copy is fine.
                        Dest::Relay { .. } => pending.push((dest, datagram.to_vec())),
                    }
                }
                // The passive signal is per peer and batch, not per packet; the control
                // channel's own messages do not make a peer busy.
                if last_peer != Some(peer) && !core.is_control(&pkts[i * SLOT..i * SLOT + len]) {
                    last_peer = Some(peer);
                    if let Some(sel) = core.paths.as_mut() {
                        sel.handle_data_sent(&peer, now);
                    }
                }
            }
            drain_transmits(&mut core, &mut pending, false);
            core.my_id()
        };
        send_all(sh, &mut mmsg, &out, &sends);
        sends.clear();
        sh.send_pending(&mut pending, &my_id, &mut scratch);
    }
}

fn udp_loop(sh: &Shared, id: SockId) {
    let Some(sock) = sh.socks.get(usize::from(id)) else {
        return;
    };
    let mut batch = RecvBatch::new();
    let mut out = vec![0u8; BATCH * SLOT];
    let mut writes: Vec<Write> = Vec::with_capacity(BATCH);
    let mut pending: Vec<Pending> = Vec::new();
    let mut scratch = Vec::with_capacity(SLOT);
    while !sh.stopping.load(Ordering::Relaxed) {
        let n = match batch.recv(sock.as_raw_fd()) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                if !sh.stopping.load(Ordering::Relaxed) {
                    warn!(error = %e, "UDP read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let my_id = {
            let mut core = sh.core();
            let now = Instant::now();
            for i in 0..n {
                let Some((src, datagram)) = batch.get(i) else {
                    continue;
                };
                let slot = &mut out[i * SLOT..(i + 1) * SLOT];
                let base = slot.as_ptr() as usize;
                let path = Path {
                    local: id,
                    remote: src,
                };
                if wire::is_path_message(datagram) {
                    if let Some(w) =
                        handle_path_message(&mut core, path, datagram, slot, now, &mut pending)
                    {
                        writes.push(Write::Slot(i * SLOT + (w.0 - base), w.1));
                    }
                    continue;
                }
                let counter = reorder::data_counter(datagram);
                let (peer, packet, data) =
                    match core.overlay.handle_datagram(path, datagram, slot, now) {
                        Decap::Tunnel { peer, packet } => {
                            let data = !core.is_control(packet);
                            (peer, Some((packet.as_ptr() as usize, packet.len())), data)
                        }
                        // Keepalives and handshakes prove the path, but are not traffic.
                        Decap::Consumed { peer } => (peer, None, false),
                        Decap::Foreign | Decap::Dropped(_) => continue,
                    };
                if let Some((ptr, len)) = packet {
                    let offset = i * SLOT + (ptr - base);
                    match counter {
                        Some((session, ctr)) => match core.reorder_push(
                            peer,
                            session,
                            ctr,
                            &out[offset..offset + len],
                            now,
                        ) {
                            Verdict::Deliver { then } => {
                                writes.push(Write::Slot(offset, len));
                                writes.extend(then.into_iter().map(Write::Owned));
                            }
                            Verdict::Held => {}
                            Verdict::Flush(all) => writes.extend(all.into_iter().map(Write::Owned)),
                        },
                        None => writes.push(Write::Slot(offset, len)),
                    }
                }
                if let Some(sel) = core.paths.as_mut() {
                    let path = PathId::direct(id, src);
                    if data {
                        sel.handle_data_received(&peer, &path, now);
                    } else {
                        sel.handle_alive(&peer, &path, now);
                    }
                }
            }
            core.poll_nacks(&mut pending);
            drain_transmits(&mut core, &mut pending, true);
            core.my_id()
        };
        for w in writes.drain(..) {
            let packet = match &w {
                Write::Slot(offset, len) => &out[*offset..*offset + *len],
                Write::Owned(p) => p.as_slice(),
            };
            if let Err(e) = sh.tun.send(packet) {
                trace!(error = %e, "TUN write failed");
            }
        }
        sh.send_pending(&mut pending, &my_id, &mut scratch);
    }
}

/// A path message: probes go to the selector; a relay envelope is forwarded (this node is
/// the relay) or unwrapped (this node is the destination) and its WireGuard datagram goes to
/// the overlay. Returns where a decrypted packet for the TUN device lies in `slot` (as an
/// address and length).
fn handle_path_message(
    core: &mut Core,
    path: Path<SockId>,
    datagram: &[u8],
    slot: &mut [u8],
    now: Instant,
    pending: &mut Vec<Pending>,
) -> Option<(usize, usize)> {
    let sel = core.paths.as_mut()?;
    match sel.handle_datagram(path.local, path.remote, datagram, now) {
        Ok(Handled::Consumed { .. }) => None,
        Ok(Handled::Nack { peer, nack }) => {
            core.handle_nack(peer, &nack, pending);
            None
        }
        Ok(Handled::Forward { to, path, datagram }) => {
            if let Some(dest) = core.resolve(to, &path) {
                pending.push((dest, datagram));
            }
            None
        }
        Ok(Handled::Relayed { from, relay, inner }) => {
            let inner = datagram.get(inner)?;
            // The relay's address is no way back to the peer: the overlay gets an unspecified
            // one, so nothing is ever sent there unwrapped.
            let via = Path {
                local: path.local,
                remote: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            };
            let (result, data) = match core.overlay.handle_datagram(via, inner, slot, now) {
                Decap::Tunnel { packet, .. } => (
                    Some((packet.as_ptr() as usize, packet.len())),
                    !core.is_control(packet),
                ),
                Decap::Consumed { .. } => (None, false),
                Decap::Foreign | Decap::Dropped(_) => return None,
            };
            if let Some(sel) = core.paths.as_mut() {
                let relayed = PathId::relay(path.local, relay);
                if data {
                    sel.handle_data_received(&from, &relayed, now);
                } else {
                    sel.handle_alive(&from, &relayed, now);
                }
            }
            result
        }
        Err(e) => {
            trace!(src = %path.remote, error = %e, "path message refused");
            None
        }
    }
}

fn timer_loop(sh: &Shared) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut released: Vec<Vec<u8>> = Vec::new();
    let mut scratch = Vec::with_capacity(SLOT);
    while !sh.stopping.load(Ordering::Relaxed) {
        let (wake, my_id) = {
            let mut core = sh.core();
            let now = Instant::now();
            core.overlay.handle_timeout(now);
            if let Some(sel) = core.paths.as_mut() {
                sel.handle_timeout(now);
            }
            drain_transmits(&mut core, &mut pending, false);
            log_events(sh, &mut core);
            core.refresh_reorder(now);
            core.reorder_expired(now, &mut released);
            let overlay = core.overlay.poll_timeout().map(|(t, _)| t);
            let paths = core
                .paths
                .as_ref()
                .and_then(|s| s.poll_timeout())
                .map(|(t, _)| t);
            let reorder = core.reorder_deadline();
            (
                overlay.into_iter().chain(paths).chain(reorder).min(),
                core.my_id(),
            )
        };
        for p in released.drain(..) {
            if let Err(e) = sh.tun.send(&p) {
                trace!(error = %e, "TUN write failed");
            }
        }
        sh.send_pending(&mut pending, &my_id, &mut scratch);
        let sleep = wake
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(MAX_TIMER_SLEEP)
            .clamp(Duration::from_millis(1), MAX_TIMER_SLEEP);
        std::thread::sleep(sleep);
    }
}

/// Logs the cores' events (path switches at INFO) and keeps the observed addresses.
fn log_events(sh: &Shared, core: &mut Core) {
    while let Some(e) = core.overlay.poll_event() {
        match e {
            mistnet_overlay::Event::PeerUp(p) => info!(peer = core.name_of(p), "peer up"),
            mistnet_overlay::Event::PeerDown(p) => info!(peer = core.name_of(p), "peer down"),
            mistnet_overlay::Event::PathChanged { peer, path } => {
                debug!(peer = core.name_of(peer), %path, "path changed")
            }
        }
    }
    while let Some(e) = core.paths.as_mut().and_then(|s| s.poll_event()) {
        match e {
            mistnet_path::Event::ActivePathChanged {
                peer,
                from,
                to,
                reason,
            } => info!(
                peer = core.name_of(peer),
                from = from.map(|p| core.describe(&p)),
                to = to.map(|p| core.describe(&p)),
                reason = reason.as_str(),
                "path switched"
            ),
            mistnet_path::Event::RedundancyChanged {
                peer,
                secondary,
                reason,
            } => info!(
                peer = core.name_of(peer),
                secondary = secondary.map(|p| core.describe(&p)),
                reason = reason.as_str(),
                "redundancy changed"
            ),
            mistnet_path::Event::CandidateDiscovered { peer, path } => debug!(
                peer = core.name_of(peer),
                path = core.describe(&path),
                "candidate path discovered"
            ),
            mistnet_path::Event::ObservedAddress { addr, .. } => {
                let mut observed = crate::lock(&sh.observed);
                if !observed.contains(&addr) {
                    debug!(%addr, "observed address");
                    if observed.len() >= MAX_OBSERVED
                        && let Some(first) = observed.iter().next().copied()
                    {
                        observed.remove(&first);
                    }
                    observed.insert(addr);
                }
            }
        }
    }
}

/// Sends the datagrams in `out`, one `sendmmsg` per run leaving on the same socket.
fn send_all(sh: &Shared, mmsg: &mut SendBatch, out: &[u8], sends: &[Out]) {
    let mut start = 0;
    while start < sends.len() {
        let local = sends[start].path.local;
        let end = sends[start..]
            .iter()
            .position(|s| s.path.local != local)
            .map_or(sends.len(), |p| start + p);
        if let Some(sock) = sh.socks.get(usize::from(local)) {
            mmsg.send(sock.as_raw_fd(), out, &sends[start..end]);
        }
        start = end;
    }
}

/// Waits until `fd` is readable or `timeout_ms` passed.
fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Buffers for one `recvmmsg` of up to [`BATCH`] datagrams.
struct RecvBatch {
    data: Vec<u8>,
    addrs: [libc::sockaddr_in6; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    n: usize,
}

impl RecvBatch {
    fn new() -> Self {
        Self {
            data: vec![0u8; BATCH * SLOT],
            // SAFETY: plain C structs for which all-zero is a valid value.
            addrs: unsafe { std::mem::zeroed() },
            // SAFETY: as above (null pointers are overwritten before use).
            iovs: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            hdrs: unsafe { std::mem::zeroed() },
            n: 0,
        }
    }

    /// Blocks until at least one datagram arrives; returns how many were read.
    fn recv(&mut self, fd: RawFd) -> std::io::Result<usize> {
        let base = self.data.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: slot i lies inside `data` (BATCH * SLOT bytes).
            self.iovs[i].iov_base = unsafe { base.add(i * SLOT) }.cast();
            self.iovs[i].iov_len = SLOT;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by self that outlive the call.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.n = 0;
            return Err(std::io::Error::last_os_error());
        }
        self.n = usize::try_from(rc).unwrap_or(0);
        Ok(self.n)
    }

    /// Source and bytes of datagram `i` of the last read (None for a truncated datagram or
    /// an address that is not IPv6/v4-mapped).
    fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.n || self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let a = &self.addrs[i];
        if libc::c_int::from(a.sin6_family) != libc::AF_INET6 {
            return None;
        }
        let ip = Ipv6Addr::from(a.sin6_addr.s6_addr).to_canonical();
        let src = SocketAddr::new(ip, u16::from_be(a.sin6_port));
        let len = usize::try_from(self.hdrs[i].msg_len).ok()?.min(SLOT);
        Some((src, &self.data[i * SLOT..i * SLOT + len]))
    }
}

/// Headers for one `sendmmsg` of up to [`BATCH`] datagrams.
struct SendBatch {
    addrs: [libc::sockaddr_in6; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
}

impl SendBatch {
    fn new() -> Self {
        Self {
            // SAFETY: plain C structs for which all-zero is a valid value.
            addrs: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            iovs: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            hdrs: unsafe { std::mem::zeroed() },
        }
    }

    /// Sends `sends` (slices of `out`) on `fd`; a datagram the kernel refuses is skipped.
    fn send(&mut self, fd: RawFd, out: &[u8], sends: &[Out]) {
        let n = sends.len().min(BATCH);
        for (i, s) in sends.iter().take(n).enumerate() {
            self.addrs[i] = sockaddr_v6(s.path.remote);
            let Some(bytes) = out.get(s.offset..s.offset + s.len) else {
                self.iovs[i].iov_len = 0;
                continue;
            };
            // The kernel only reads through this pointer.
            self.iovs[i].iov_base = bytes.as_ptr().cast_mut().cast();
            self.iovs[i].iov_len = bytes.len();
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: headers [done..n] point at buffers that outlive the call.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[done..].as_mut_ptr(),
                    libc::c_uint::try_from(n - done).unwrap_or(0),
                    0,
                )
            };
            if rc <= 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                trace!(error = %e, "sendmmsg failed; skipping a datagram");
                done += 1;
            } else {
                done += usize::try_from(rc).unwrap_or(1);
            }
        }
    }
}

/// IPv4 destinations go through the dual-stack sockets as v4-mapped addresses.
fn v6_mapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        SocketAddr::V6(_) => a,
    }
}

fn sockaddr_v6(a: SocketAddr) -> libc::sockaddr_in6 {
    let SocketAddr::V6(v6) = v6_mapped(a) else {
        unreachable!("v6_mapped returns IPv6")
    };
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = v6.port().to_be();
    s.sin6_addr.s6_addr = v6.ip().octets();
    s.sin6_flowinfo = v6.flowinfo();
    s.sin6_scope_id = v6.scope_id();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_over_loopback() {
        let rx = UdpSocket::bind("[::1]:0").unwrap();
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let dst = rx.local_addr().unwrap();
        let mut out = vec![0u8; 3 * SLOT];
        let mut sends = Vec::new();
        for i in 0..3u8 {
            out[usize::from(i) * SLOT..usize::from(i) * SLOT + 3].copy_from_slice(&[i; 3]);
            sends.push(Out {
                path: Path {
                    local: 0,
                    remote: dst,
                },
                offset: usize::from(i) * SLOT,
                len: 3,
            });
        }
        SendBatch::new().send(tx.as_raw_fd(), &out, &sends);
        let mut got = Vec::new();
        let mut batch = RecvBatch::new();
        while got.len() < 3 {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let (src, d) = batch.get(i).unwrap();
                assert_eq!(src, tx.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, vec![vec![0; 3], vec![1; 3], vec![2; 3]]);
    }
}
