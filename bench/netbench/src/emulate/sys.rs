//! The emulator's I/O shell: namespace and veth setup, AF_PACKET sockets, the poll loop.
//! All decisions are in [`super::fabric`]; this file only moves frames and time.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::{Cmd, Config};

/// Runs on the emulator's own thread; reports setup success or failure on `ready`.
pub(super) fn run(
    cfg: Config,
    rx: mpsc::Receiver<Cmd>,
    wake: UnixStream,
    ready: mpsc::Sender<Result<()>>,
) -> Result<()> {
    let socks = match setup(&cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    wake.set_nonblocking(true).context("waker")?;
    let base = Instant::now();
    let now = || base.elapsed().as_nanos() as u64;
    let mut fabric = cfg.fabric(now())?;
    let _ = ready.send(Ok(()));
    tracing::debug!(nodes = cfg.nodes.len(), "emulator forwarding");

    let mut pfds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
        .chain(socks.iter().map(AsRawFd::as_raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65_600];
    loop {
        let timeout = fabric.poll_timeout().map(|(t, _)| t.saturating_sub(now()));
        let ts = timeout.map(|ns| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: pfds is a valid array of pollfd for its length; tsp is null or points to a
        // timespec that outlives the call; a null sigmask keeps the current one.
        let rc = unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                tsp,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("ppoll");
        }
        if pfds[0].revents != 0 {
            let mut sink = [0u8; 64];
            while matches!((&wake).read(&mut sink), Ok(n) if n > 0) {}
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Cmd::Set { links, spec, reply } => {
                        let r = fabric.set(&links, &spec).map_err(anyhow::Error::from);
                        tracing::debug!(%links, %spec, ok = r.is_ok(), "link settings changed");
                        let _ = reply.send(r);
                    }
                    Cmd::Stats { reply } => {
                        let _ = reply.send(fabric.stats());
                    }
                    Cmd::Stop => return Ok(()),
                }
            }
            // A closed waker means the handle is gone.
            if pfds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(());
            }
        }
        for (port, pfd) in pfds[1..].iter().enumerate() {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            // Bounded batch per port so one busy port cannot starve the others or the timers.
            for _ in 0..256 {
                // SAFETY: buf is valid for writes of its length.
                let n = unsafe {
                    libc::recv(
                        pfd.fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
                fabric.handle_frame(now(), port, &buf[..n as usize]);
            }
        }
        let t = now();
        fabric.handle_timeout(t);
        while let Some((port, frame)) = fabric.poll_transmit(t) {
            // SAFETY: frame is a valid buffer; the fd is one of our bound packet sockets.
            let n = unsafe {
                libc::send(
                    socks[port].as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                tracing::trace!(port, err = %std::io::Error::last_os_error(), "send failed");
            }
        }
    }
}

fn setup(cfg: &Config) -> Result<Vec<OwnedFd>> {
    // SAFETY: plain syscalls on this thread only; unshare(CLONE_NEWNET) moves just this task.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error()).context(
                "unshare(CLONE_NEWNET): the emulator needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN)",
            );
        }
        // Timer slack of 1 ns: delays are scheduled with ppoll, whose default slack is 50 µs.
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let host_mtu = cfg
        .nodes
        .iter()
        .map(|n| n.mtu)
        .max()
        .unwrap_or(1500)
        .max(1500);
    let mut socks = Vec::new();
    for (i, node) in cfg.nodes.iter().enumerate() {
        let h = format!("h{i}");
        let p = format!("p{i}");
        ip(&[
            "link",
            "add",
            &h,
            "mtu",
            &host_mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            &p,
        ])?;
        for dev in [&h, &p] {
            disable_tx_offload(dev).with_context(|| format!("turning off offloads on {dev}"))?;
        }
        ip(&["link", "set", &p, "netns", &node.netns]).with_context(|| {
            format!(
                "node {}: moving its interface into netns {:?}",
                node.name, node.netns
            )
        })?;
        ip(&[
            "-n",
            &node.netns,
            "link",
            "set",
            "dev",
            &p,
            "name",
            &node.ifname,
        ])
        .with_context(|| {
            format!(
                "node {}: naming its interface {:?} in netns {:?}",
                node.name, node.ifname, node.netns
            )
        })?;
        ip(&[
            "-n",
            &node.netns,
            "link",
            "set",
            "dev",
            &node.ifname,
            "mtu",
            &node.mtu.to_string(),
            "up",
        ])?;
        for a in &node.addrs {
            ip(&[
                "-n",
                &node.netns,
                "addr",
                "add",
                a,
                "dev",
                &node.ifname,
                "nodad",
            ])
            .with_context(|| format!("node {}: adding {a}", node.name))?;
        }
        // The emulator's ends are wires, not hosts: no IPv6 chatter of their own.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{h}/disable_ipv6"), "1");
        ip(&["link", "set", &h, "up"])?;
        socks.push(packet_socket(&h)?);
    }
    Ok(socks)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An AF_PACKET socket bound to `dev` that sees every frame the device receives but none it
/// sends (so our own transmissions do not loop back).
fn packet_socket(dev: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("if_nametoindex({dev})"));
    }
    // SAFETY: socket() has no memory arguments; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = sock.as_raw_fd();
    setsockopt(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)
        .context("PACKET_IGNORE_OUTGOING")?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20).context("SO_RCVBUFFORCE")?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20).context("SO_SNDBUFFORCE")?;
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll and the length matches.
    let rc = unsafe {
        libc::bind(
            raw,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding a packet socket to {dev}"));
    }
    Ok(sock)
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: val lives across the call and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const val).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ethtool -K DEV tx off` through the legacy ETHTOOL_STXCSUM ioctl (which also drops TSO),
/// so the emulator needs no ethtool binary.
fn disable_tx_offload(dev: &str) -> Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut val = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        bail!("interface name {dev:?} too long");
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut val).cast();
    // SAFETY: a plain UDP socket for the ioctl, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for ethtool ioctl");
    }
    // SAFETY: fd is fresh and owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifr points to a valid ifreq whose data pointer refers to `val`, alive here.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCETHTOOL ETHTOOL_STXCSUM");
    }
    Ok(())
}
