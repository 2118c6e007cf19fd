//! The netbench wire protocol (pure: no I/O).
//!
//! Every message starts with a 4-byte header: the magic `NB`, the protocol version and the
//! message kind. Fields are big-endian and fixed-size; a message may be followed by padding
//! (probes are padded to the requested packet size) which decoding ignores. Decoding is total:
//! any byte string yields a message or a [`DecodeError`], never a panic, so a server can be fed
//! garbage from the network.

use thiserror::Error;

/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"NB";
/// Bumped on any incompatible change; peers reject other versions.
pub const VERSION: u8 = 1;
/// Header: magic, version, kind.
pub const HEADER_LEN: usize = 4;
/// Default port for both the TCP and the UDP side of `netbench server`.
pub const DEFAULT_PORT: u16 = 9300;

/// What a UDP session measures; chosen by the client's `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Round trips: the server echoes probes.
    Rtt,
    /// One-way stream at a target rate: the server counts and reports.
    Stream,
}

/// One protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Client → server (UDP): opens a session.
    Hello { session: u64, mode: Mode },
    /// Server → client: session accepted.
    HelloAck { session: u64 },
    /// Client → server (UDP): an RTT probe; the server echoes it padded to `reply_len`.
    Probe {
        session: u64,
        seq: u64,
        send_ns: u64,
        reply_len: u16,
    },
    /// Server → client: the echo of a probe; `server_seen` counts the session's probes so far.
    Echo {
        session: u64,
        seq: u64,
        send_ns: u64,
        server_seen: u64,
    },
    /// Client → server (UDP): one packet of a rate-paced stream.
    Data {
        session: u64,
        seq: u64,
        send_ns: u64,
    },
    /// Client → server: asks for the session's receive report.
    ReportReq { session: u64 },
    /// Server → client: what the server saw of a session.
    Report(Report),
    /// Client → server (TCP): first frame of a throughput stream.
    TcpHello {
        session: u64,
        stream: u16,
        reverse: bool,
        duration_ms: u32,
    },
    /// Server → client (TCP): what the receiving server counted on one forward stream.
    TcpResult { bytes: u64, elapsed_ns: u64 },
}

/// The server's view of a UDP session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    pub session: u64,
    /// Packets received, duplicates included.
    pub received: u64,
    /// Distinct sequence numbers received.
    pub unique: u64,
    pub duplicates: u64,
    /// Packets that arrived after one with a higher sequence number.
    pub reordered: u64,
    /// RFC 3550 interarrival jitter, nanoseconds.
    pub jitter_ns: u64,
    pub bytes: u64,
    /// Time from the first to the last packet, on the server's clock.
    pub span_ns: u64,
}

/// Why bytes did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is shorter than the header")]
    Short(usize),
    #[error("bad magic (not a netbench packet)")]
    Magic,
    #[error("protocol version {0} (this netbench speaks {VERSION})")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("message kind {kind} truncated")]
    Truncated { kind: u8 },
    #[error("invalid field value in message kind {kind}")]
    Field { kind: u8 },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const PROBE: u8 = 3;
    pub const ECHO: u8 = 4;
    pub const DATA: u8 = 5;
    pub const REPORT_REQ: u8 = 6;
    pub const REPORT: u8 = 7;
    pub const TCP_HELLO: u8 = 8;
    pub const TCP_RESULT: u8 = 9;
}

impl Message {
    /// Encodes into `buf` (cleared first) and pads with zeros up to `pad_to` bytes.
    pub fn encode(&self, buf: &mut Vec<u8>, pad_to: usize) {
        buf.clear();
        buf.extend_from_slice(&MAGIC);
        buf.push(VERSION);
        match *self {
            Message::Hello { session, mode } => {
                buf.push(kind::HELLO);
                put64(buf, session);
                buf.push(match mode {
                    Mode::Rtt => 1,
                    Mode::Stream => 2,
                });
            }
            Message::HelloAck { session } => {
                buf.push(kind::HELLO_ACK);
                put64(buf, session);
            }
            Message::Probe {
                session,
                seq,
                send_ns,
                reply_len,
            } => {
                buf.push(kind::PROBE);
                put64(buf, session);
                put64(buf, seq);
                put64(buf, send_ns);
                buf.extend_from_slice(&reply_len.to_be_bytes());
            }
            Message::Echo {
                session,
                seq,
                send_ns,
                server_seen,
            } => {
                buf.push(kind::ECHO);
                for v in [session, seq, send_ns, server_seen] {
                    put64(buf, v);
                }
            }
            Message::Data {
                session,
                seq,
                send_ns,
            } => {
                buf.push(kind::DATA);
                for v in [session, seq, send_ns] {
                    put64(buf, v);
                }
            }
            Message::ReportReq { session } => {
                buf.push(kind::REPORT_REQ);
                put64(buf, session);
            }
            Message::Report(r) => {
                buf.push(kind::REPORT);
                for v in [
                    r.session,
                    r.received,
                    r.unique,
                    r.duplicates,
                    r.reordered,
                    r.jitter_ns,
                    r.bytes,
                    r.span_ns,
                ] {
                    put64(buf, v);
                }
            }
            Message::TcpHello {
                session,
                stream,
                reverse,
                duration_ms,
            } => {
                buf.push(kind::TCP_HELLO);
                put64(buf, session);
                buf.extend_from_slice(&stream.to_be_bytes());
                buf.push(u8::from(reverse));
                buf.extend_from_slice(&duration_ms.to_be_bytes());
            }
            Message::TcpResult { bytes, elapsed_ns } => {
                buf.push(kind::TCP_RESULT);
                put64(buf, bytes);
                put64(buf, elapsed_ns);
            }
        }
        if buf.len() < pad_to {
            buf.resize(pad_to, 0);
        }
    }

    /// Decodes one message; trailing bytes (padding) are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Short(bytes.len()));
        };
        if header[..2] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if header[2] != VERSION {
            return Err(DecodeError::Version(header[2]));
        }
        let k = header[3];
        let mut r = Reader { buf: body, kind: k };
        let msg = match k {
            kind::HELLO => {
                let session = r.u64()?;
                let mode = match r.u8()? {
                    1 => Mode::Rtt,
                    2 => Mode::Stream,
                    _ => return Err(DecodeError::Field { kind: k }),
                };
                Message::Hello { session, mode }
            }
            kind::HELLO_ACK => Message::HelloAck { session: r.u64()? },
            kind::PROBE => Message::Probe {
                session: r.u64()?,
                seq: r.u64()?,
                send_ns: r.u64()?,
                reply_len: r.u16()?,
            },
            kind::ECHO => Message::Echo {
                session: r.u64()?,
                seq: r.u64()?,
                send_ns: r.u64()?,
                server_seen: r.u64()?,
            },
            kind::DATA => Message::Data {
                session: r.u64()?,
                seq: r.u64()?,
                send_ns: r.u64()?,
            },
            kind::REPORT_REQ => Message::ReportReq { session: r.u64()? },
            kind::REPORT => Message::Report(Report {
                session: r.u64()?,
                received: r.u64()?,
                unique: r.u64()?,
                duplicates: r.u64()?,
                reordered: r.u64()?,
                jitter_ns: r.u64()?,
                bytes: r.u64()?,
                span_ns: r.u64()?,
            }),
            kind::TCP_HELLO => {
                let session = r.u64()?;
                let stream = r.u16()?;
                let reverse = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Field { kind: k }),
                };
                Message::TcpHello {
                    session,
                    stream,
                    reverse,
                    duration_ms: r.u32()?,
                }
            }
            kind::TCP_RESULT => Message::TcpResult {
                bytes: r.u64()?,
                elapsed_ns: r.u64()?,
            },
            other => return Err(DecodeError::Kind(other)),
        };
        Ok(msg)
    }

    /// Encoded length without padding.
    pub fn encoded_len(&self) -> usize {
        let mut v = Vec::with_capacity(80);
        self.encode(&mut v, 0);
        v.len()
    }
}

/// Length of a framed TCP control message (`TcpHello` / `TcpResult`), which are sent unpadded.
pub const TCP_HELLO_LEN: usize = HEADER_LEN + 8 + 2 + 1 + 4;
pub const TCP_RESULT_LEN: usize = HEADER_LEN + 16;

fn put64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_be_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(DecodeError::Truncated { kind: self.kind });
        };
        self.buf = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                session: 7,
                mode: Mode::Rtt,
            },
            Message::Hello {
                session: u64::MAX,
                mode: Mode::Stream,
            },
            Message::HelloAck { session: 7 },
            Message::Probe {
                session: 1,
                seq: 2,
                send_ns: 3,
                reply_len: 1400,
            },
            Message::Echo {
                session: 1,
                seq: 2,
                send_ns: 3,
                server_seen: 4,
            },
            Message::Data {
                session: 1,
                seq: 9,
                send_ns: 10,
            },
            Message::ReportReq { session: 5 },
            Message::Report(Report {
                session: 1,
                received: 2,
                unique: 3,
                duplicates: 4,
                reordered: 5,
                jitter_ns: 6,
                bytes: 7,
                span_ns: 8,
            }),
            Message::TcpHello {
                session: 3,
                stream: 2,
                reverse: true,
                duration_ms: 10_000,
            },
            Message::TcpResult {
                bytes: 1 << 40,
                elapsed_ns: 5,
            },
        ]
    }

    #[test]
    fn round_trip_with_and_without_padding() {
        let mut buf = Vec::new();
        for m in samples() {
            m.encode(&mut buf, 0);
            assert_eq!(Message::decode(&buf).unwrap(), m);
            m.encode(&mut buf, 1200);
            assert_eq!(buf.len(), 1200);
            assert_eq!(Message::decode(&buf).unwrap(), m);
        }
        assert_eq!(
            Message::TcpHello {
                session: 0,
                stream: 0,
                reverse: false,
                duration_ms: 0
            }
            .encoded_len(),
            TCP_HELLO_LEN
        );
        assert_eq!(
            Message::TcpResult {
                bytes: 0,
                elapsed_ns: 0
            }
            .encoded_len(),
            TCP_RESULT_LEN
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert_eq!(Message::decode(b""), Err(DecodeError::Short(0)));
        assert_eq!(Message::decode(b"XX\x01\x01"), Err(DecodeError::Magic));
        assert_eq!(Message::decode(b"NB\x09\x01"), Err(DecodeError::Version(9)));
        assert_eq!(Message::decode(b"NB\x01\xee"), Err(DecodeError::Kind(0xee)));
        let mut buf = Vec::new();
        for m in samples() {
            m.encode(&mut buf, 0);
            for cut in 0..buf.len() {
                assert!(Message::decode(&buf[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
        // Out-of-range enum fields.
        let mut hello = Vec::new();
        Message::Hello {
            session: 1,
            mode: Mode::Rtt,
        }
        .encode(&mut hello, 0);
        hello[12] = 9;
        assert_eq!(Message::decode(&hello), Err(DecodeError::Field { kind: 1 }));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decoding_arbitrary_bodies_never_panics(k in 0u8..12, body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut bytes = vec![b'N', b'B', VERSION, k];
            bytes.extend(body);
            if let Ok(m) = Message::decode(&bytes) {
                // Whatever decodes re-encodes to a prefix of the input.
                let mut buf = Vec::new();
                m.encode(&mut buf, 0);
                prop_assert_eq!(&bytes[..buf.len()], &buf[..]);
            }
        }
    }
}
