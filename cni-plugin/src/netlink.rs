//! A small synchronous rtnetlink client: just what the plugin needs, no async runtime.
//!
//! A netlink socket acts in the network namespace it was created in, so the plugin opens one
//! socket in the host namespace and one in the pod's (see [`crate::netns`]) and never moves
//! its thread between namespaces while talking to the kernel.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {op}")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("kernel rejected {op}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink reply to {op}: {reason}")]
    Decode { op: &'static str, reason: String },
}

impl NetlinkError {
    /// The errno the kernel answered with, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } | NetlinkError::Socket { source, .. } => {
                source.raw_os_error()
            }
            NetlinkError::Decode { .. } => None,
        }
    }

    /// The object was not there (ENODEV, ENOENT, ESRCH, EADDRNOTAVAIL).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// The object already existed.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

/// A connected rtnetlink socket in one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let sock_err = |op| move |source| NetlinkError::Socket { op, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(sock_err("socket"))?;
        socket.bind_auto().map_err(sock_err("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(sock_err("connect"))?;
        // Extended acks make the kernel explain rejected requests; failure only loses detail.
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
    ) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let len = nl.buffer_len();
        let mut out = vec![0u8; len];
        nl.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetlinkError::Socket { op, source })?;
        Ok(self.seq)
    }

    /// Sends several requests in one datagram and waits for all their acknowledgements. The
    /// kernel handles them in order; the first failure is returned (later requests may or may
    /// not have been applied, so callers roll back the whole object on error).
    pub fn request_batch(
        &mut self,
        msgs: Vec<(RouteNetlinkMessage, u16)>,
        op: &'static str,
    ) -> Result<(), NetlinkError> {
        let mut out = Vec::with_capacity(512);
        let first = self.seq.wrapping_add(1);
        for (msg, flags) in msgs {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = self.seq;
            let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
            nl.finalize();
            let start = out.len();
            out.resize(start + nl.buffer_len(), 0);
            nl.serialize(&mut out[start..]);
        }
        let last = self.seq;
        let mut pending = last.wrapping_sub(first).wrapping_add(1);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetlinkError::Socket { op, source })?;
        let mut failure = None;
        while pending > 0 {
            let n = self.recv(op)?;
            let mut off = 0;
            while off < n {
                let (msg, len) = parse_one(&self.buf[off..n], op)?;
                off += len;
                let seq = msg.header.sequence_number;
                if seq.wrapping_sub(first) > last.wrapping_sub(first) {
                    continue;
                }
                if let NetlinkPayload::Error(e) = msg.payload {
                    pending -= 1;
                    if let Some(code) = e.code
                        && failure.is_none()
                    {
                        failure = Some(NetlinkError::Kernel {
                            op,
                            source: io::Error::from_raw_os_error(-code.get()),
                        });
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends a request and waits for its acknowledgement.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
    ) -> Result<(), NetlinkError> {
        self.collect(msg, flags | NLM_F_ACK, op).map(|_| ())
    }

    /// Sends a dump request and collects every message of the reply.
    pub fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        op: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.collect(msg, NLM_F_DUMP, op)
    }

    /// Sends a get request for one object and returns the reply.
    pub fn get(
        &mut self,
        msg: RouteNetlinkMessage,
        op: &'static str,
    ) -> Result<RouteNetlinkMessage, NetlinkError> {
        self.collect(msg, 0, op)?
            .into_iter()
            .next()
            .ok_or(NetlinkError::Decode {
                op,
                reason: "empty reply".into(),
            })
    }

    fn collect(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let seq = self.send(msg, flags, op)?;
        let mut out = Vec::new();
        loop {
            let n = self.recv(op)?;
            let mut off = 0;
            while off < n {
                let (msg, len) = parse_one(&self.buf[off..n], op)?;
                off += len;
                if msg.header.sequence_number != seq {
                    continue;
                }
                let multipart = msg.header.flags & netlink_packet_core::NLM_F_MULTIPART != 0;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !multipart {
                            return Ok(out);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Kernel {
                                op,
                                source: io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                    other => {
                        return Err(NetlinkError::Decode {
                            op,
                            reason: format!("unexpected payload {other:?}"),
                        });
                    }
                }
            }
        }
    }

    fn recv(&mut self, op: &'static str) -> Result<usize, NetlinkError> {
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Socket { op, source }),
            }
        }
    }

    // ---- typed helpers -------------------------------------------------------------------

    /// Creates an object (`NLM_F_CREATE | NLM_F_EXCL`).
    pub fn create(
        &mut self,
        msg: RouteNetlinkMessage,
        op: &'static str,
    ) -> Result<(), NetlinkError> {
        self.request(msg, NLM_F_CREATE | NLM_F_EXCL, op)
    }

    /// Looks up a link by name.
    pub fn link_by_name(&mut self, name: &str) -> Result<LinkMessage, NetlinkError> {
        let mut req = LinkMessage::default();
        req.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let reply = self.get(RouteNetlinkMessage::GetLink(req), "get link")?;
        let RouteNetlinkMessage::NewLink(link) = reply else {
            return Err(NetlinkError::Decode {
                op: "get link",
                reason: format!("unexpected reply {reply:?}"),
            });
        };
        Ok(link)
    }

    /// Deletes a link by index.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(req), 0, "delete link")
    }

    /// Deletes a link by name; a missing link is success.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut req = LinkMessage::default();
        req.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(req), 0, "delete link") {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets a link's MTU and brings it up.
    pub fn set_link_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        req.header.flags = netlink_packet_route::link::LinkFlags::Up;
        req.header.change_mask = netlink_packet_route::link::LinkFlags::Up;
        if let Some(mtu) = mtu {
            req.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(req), 0, "set link")
    }

    /// Adds an address to a link; an existing identical address is success.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = family(ip);
        m.header.prefix_len = prefix;
        m.header.index = index;
        if ip.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(ip));
        }
        m.attributes.push(AddressAttribute::Address(ip));
        match self.create(RouteNetlinkMessage::NewAddress(m), "add address") {
            Err(e) if e.is_exists() => Ok(()),
            other => other,
        }
    }

    /// Adds or replaces a device route `dst dev <index>` in the main table.
    pub fn replace_route(&mut self, dst: ipnet::IpNet, index: u32) -> Result<(), NetlinkError> {
        let msg = device_route(dst, index);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
            "replace route",
        )
    }

    /// Deletes a device route; a missing route is success.
    pub fn delete_route(&mut self, dst: ipnet::IpNet, index: u32) -> Result<(), NetlinkError> {
        match self.request(
            RouteNetlinkMessage::DelRoute(device_route(dst, index)),
            0,
            "delete route",
        ) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// All addresses on a link.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let msgs = self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "dump addresses",
        )?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    out.push((*ip, a.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Routes of the main table as (destination, prefix, gateway, output interface).
    pub fn routes(&mut self, v6: bool) -> Result<Vec<RouteInfo>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = if v6 {
            netlink_packet_route::AddressFamily::Inet6
        } else {
            netlink_packet_route::AddressFamily::Inet
        };
        let msgs = self.dump(RouteNetlinkMessage::GetRoute(req), "dump routes")?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut info = RouteInfo {
                dst: None,
                prefix: r.header.destination_prefix_length,
                gw: None,
                oif: None,
                table: r.header.table,
            };
            for attr in &r.attributes {
                if let RouteAttribute::Destination(a) = attr {
                    info.dst = route_addr(a);
                } else if let RouteAttribute::Gateway(a) = attr {
                    info.gw = route_addr(a);
                } else if let RouteAttribute::Oif(i) = attr {
                    info.oif = Some(*i);
                } else if let RouteAttribute::Table(t) = attr
                    && let Ok(t) = u8::try_from(*t)
                {
                    info.table = t;
                }
            }
            out.push(info);
        }
        Ok(out)
    }
}

fn family(ip: IpAddr) -> netlink_packet_route::AddressFamily {
    if ip.is_ipv4() {
        netlink_packet_route::AddressFamily::Inet
    } else {
        netlink_packet_route::AddressFamily::Inet6
    }
}

fn device_route(dst: ipnet::IpNet, index: u32) -> RouteMessage {
    use netlink_packet_route::route::{RouteHeader, RouteProtocol, RouteScope, RouteType};
    let mut r = RouteMessage::default();
    r.header.address_family = family(dst.addr());
    r.header.destination_prefix_length = dst.prefix_len();
    r.header.table = RouteHeader::RT_TABLE_MAIN;
    r.header.protocol = RouteProtocol::Static;
    r.header.scope = RouteScope::Link;
    r.header.kind = RouteType::Unicast;
    r.attributes
        .push(RouteAttribute::Destination(to_route_addr(dst.network())));
    r.attributes.push(RouteAttribute::Oif(index));
    r
}

/// A route as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: Option<IpAddr>,
    pub prefix: u8,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u8,
}

/// Converts an address to the route attribute form.
pub fn to_route_addr(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(v) => RouteAddress::Inet(v),
        IpAddr::V6(v) => RouteAddress::Inet6(v),
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    if let RouteAddress::Inet(v) = a {
        Some(IpAddr::V4(*v))
    } else if let RouteAddress::Inet6(v) = a {
        Some(IpAddr::V6(*v))
    } else {
        None
    }
}

fn parse_one(
    buf: &[u8],
    op: &'static str,
) -> Result<(NetlinkMessage<RouteNetlinkMessage>, usize), NetlinkError> {
    if buf.len() < 4 {
        return Err(NetlinkError::Decode {
            op,
            reason: "truncated header".into(),
        });
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len < 16 || len > buf.len() {
        return Err(NetlinkError::Decode {
            op,
            reason: format!("bad message length {len}"),
        });
    }
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]).map_err(|e| {
        NetlinkError::Decode {
            op,
            reason: e.to_string(),
        }
    })?;
    // Messages are 4-byte aligned in the stream.
    Ok((msg, (len + 3) & !3))
}
