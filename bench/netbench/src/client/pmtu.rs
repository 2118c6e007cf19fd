//! Path MTU by DF probing.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::UdpSession;
use crate::proto::{Message, Mode};

#[derive(Debug, Clone)]
pub struct PmtuOpts {
    pub server: SocketAddr,
    pub min: usize,
    pub max: Option<usize>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PmtuResult {
    pub server: String,
    /// Largest IP packet (header included) that reached the server with DF set.
    pub pmtu: usize,
    /// The MTU of the local route, the search's upper bound.
    pub local_mtu: usize,
    pub probes: u64,
}

/// Binary search over IP packet sizes with DF set (IP_PMTUDISC_DO); a size passes when the
/// server echoes it (echoes are small, so only the forward path is measured).
pub fn pmtu(o: &PmtuOpts) -> Result<PmtuResult> {
    let s = UdpSession::open(o.server, Mode::Rtt)?;
    let v4 = o.server.is_ipv4();
    let (level, opt, val, mtu_opt) = if v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
            libc::IP_MTU,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
            libc::IPV6_MTU,
        )
    };
    let fd = s.sock.as_raw_fd();
    // SAFETY: val lives across the call; the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const val).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("setting IP_MTU_DISCOVER=IP_PMTUDISC_DO");
    }
    let local_mtu = get_int(fd, level, mtu_opt).context("reading the route MTU (IP_MTU)")? as usize;
    let overhead = if v4 { 28 } else { 48 };
    let min_len = Message::Probe {
        session: 0,
        seq: 0,
        send_ns: 0,
        reply_len: 0,
    }
    .encoded_len()
        + overhead;
    // A lost probe must not pass for a too-large one: wait at least three handshake RTTs.
    let timeout = o.timeout.max(s.handshake_rtt * 3);
    let mut probes = 0u64;
    let mut seq = 0u64;
    let mut try_size = |size: usize| -> Result<bool> {
        let mut buf = Vec::new();
        let mut rx = vec![0u8; 65_536];
        for _ in 0..3 {
            seq += 1;
            probes += 1;
            Message::Probe {
                session: s.session,
                seq,
                send_ns: 0,
                reply_len: 0,
            }
            .encode(&mut buf, size - overhead);
            match s.sock.send(&buf) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => return Ok(false),
                Err(e) => return Err(s.explain(e)),
            }
            s.sock.set_read_timeout(Some(timeout))?;
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                match s.sock.recv(&mut rx) {
                    Ok(n) => {
                        if let Ok(Message::Echo { seq: got, .. }) = Message::decode(&rx[..n])
                            && got == seq
                        {
                            return Ok(true);
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => return Ok(false),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break;
                    }
                    Err(e) => return Err(s.explain(e)),
                }
            }
        }
        Ok(false)
    };
    let mut lo = o.min.max(min_len);
    let mut hi = o.max.unwrap_or(local_mtu).min(local_mtu).max(lo);
    if !try_size(lo)? {
        bail!("even {lo}-byte probes do not pass to {}", o.server);
    }
    if try_size(hi)? {
        lo = hi;
    } else {
        // Invariant: lo passes, hi fails.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if try_size(mid)? { lo = mid } else { hi = mid }
        }
    }
    Ok(PmtuResult {
        server: o.server.to_string(),
        pmtu: lo,
        local_mtu,
        probes,
    })
}

fn get_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    opt: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes and len is v's size.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&raw mut v).cast(), &raw mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}
