//! Field deltas: one change of an origin-signed record sent as what changed since a base
//! version, with the origin's signature over the whole new record.
//!
//! A receiver that holds the base rebuilds the new record ([`Delta::apply`]), encodes it
//! canonically and checks the signature over it, so a delta proves exactly what the full record
//! would. Lists travel as a [`ListEdit`] (the changed middle between an unchanged front and
//! back), so moving one endpoint costs that endpoint, not the list.
//!
//! Wire form: `short u64be | base | version − base | mask u8 | fields in mask order |
//! signature[64]`, mask bits 1 name, 2 flags (0 or 1 = deleted), 4 zone, 8 endpoints,
//! 16 pod CIDRs, 32 tunnel addresses; a list is `keep_front | keep_back | n | n × item`.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::codec::{
    DecodeError, REC_FLAG_DELETED, Reader, SIG_LEN, put_cidr, put_endpoint, put_ip, put_list,
    put_str, put_varint,
};
use crate::{Endpoint, NodeRecord};

const NAME: u8 = 1;
const FLAGS: u8 = 2;
const ZONE: u8 = 4;
const ENDPOINTS: u8 = 8;
const POD_CIDRS: u8 = 16;
const TUNNEL_ADDRS: u8 = 32;
const ALL: u8 = 63;
/// Short id, base, step, mask and signature: the least a delta takes.
pub(crate) const MIN_LEN: usize = 8 + 3 + SIG_LEN;

/// One change of an origin-signed record: the fields that changed between the `base` version
/// and the new one, and the origin's signature over the whole new record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Short id of the origin.
    pub short: u64,
    /// The version the receiver must hold.
    pub base: u64,
    /// The new version (above `base`).
    pub version: u64,
    /// The new tombstone flag, if it changed.
    pub deleted: Option<bool>,
    /// The new name, if it changed.
    pub name: Option<String>,
    /// The new zone, if it changed.
    pub zone: Option<String>,
    /// How the endpoints changed, if they did.
    pub endpoints: Option<ListEdit<Endpoint>>,
    /// How the pod CIDRs changed, if they did.
    pub pod_cidrs: Option<ListEdit<IpNet>>,
    /// How the tunnel addresses changed, if they did.
    pub tunnel_addrs: Option<ListEdit<IpAddr>>,
    /// The origin's signature over the new record.
    pub signature: [u8; SIG_LEN],
}

/// A list change: the new list is the old one's first `keep_front` items, then `middle`, then
/// the old one's last `keep_back` items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEdit<T> {
    /// Items kept from the front of the old list.
    pub keep_front: u64,
    /// Items kept from the back of the old list.
    pub keep_back: u64,
    /// The items between them.
    pub middle: Vec<T>,
}

impl<T: Clone + PartialEq> ListEdit<T> {
    /// The edit from `old` to `new`, or `None` if they are equal.
    pub fn between(old: &[T], new: &[T]) -> Option<Self> {
        if old == new {
            return None;
        }
        let front = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let room = old.len().min(new.len()) - front;
        let back = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take(room)
            .take_while(|(a, b)| a == b)
            .count();
        let middle = new
            .get(front..new.len() - back)
            .map(<[T]>::to_vec)
            .unwrap_or_default();
        Some(ListEdit {
            keep_front: front as u64,
            keep_back: back as u64,
            middle,
        })
    }

    /// The new list, or `None` if the edit keeps more items than `old` has (it was made
    /// against another list).
    pub fn apply(&self, old: &[T]) -> Option<Vec<T>> {
        let front = usize::try_from(self.keep_front).ok()?;
        let back = usize::try_from(self.keep_back).ok()?;
        let back_start = old.len().checked_sub(back)?;
        if front > back_start {
            return None;
        }
        let mut v = Vec::with_capacity(front + self.middle.len() + back);
        v.extend_from_slice(old.get(..front)?);
        v.extend_from_slice(&self.middle);
        v.extend_from_slice(old.get(back_start..)?);
        Some(v)
    }

    fn encode(&self, out: &mut Vec<u8>, put: fn(&mut Vec<u8>, &T)) {
        put_varint(out, self.keep_front);
        put_varint(out, self.keep_back);
        put_list(out, &self.middle, put);
    }

    fn decode<'a>(
        r: &mut Reader<'a>,
        item: fn(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Result<Self, DecodeError> {
        Ok(ListEdit {
            keep_front: r.varint()?,
            keep_back: r.varint()?,
            middle: r.list(item)?,
        })
    }
}

impl Delta {
    /// The difference from `old` to `new` (the same origin), carrying `new`'s signature.
    pub fn between(
        short: u64,
        old: &NodeRecord,
        new: &NodeRecord,
        signature: [u8; SIG_LEN],
    ) -> Self {
        fn changed<T: PartialEq + Clone>(a: &T, b: &T) -> Option<T> {
            (a != b).then(|| b.clone())
        }
        Delta {
            short,
            base: old.version,
            version: new.version,
            deleted: changed(&old.deleted, &new.deleted),
            name: changed(&old.name, &new.name),
            zone: changed(&old.zone, &new.zone),
            endpoints: ListEdit::between(&old.endpoints, &new.endpoints),
            pod_cidrs: ListEdit::between(&old.pod_cidrs, &new.pod_cidrs),
            tunnel_addrs: ListEdit::between(&old.tunnel_addrs, &new.tunnel_addrs),
            signature,
        }
    }

    /// The new record, from the record at the base version (the caller checks that `base` is
    /// at [`Delta::base`]; the signature is checked by whoever verifies the result). `None`
    /// if a list edit does not fit `base`.
    pub fn apply(&self, base: &NodeRecord) -> Option<NodeRecord> {
        let mut rec = base.clone();
        rec.version = self.version;
        if let Some(d) = self.deleted {
            rec.deleted = d;
        }
        if let Some(n) = &self.name {
            rec.name.clone_from(n);
        }
        if let Some(z) = &self.zone {
            rec.zone.clone_from(z);
        }
        if let Some(e) = &self.endpoints {
            rec.endpoints = e.apply(&base.endpoints)?;
        }
        if let Some(c) = &self.pod_cidrs {
            rec.pod_cidrs = c.apply(&base.pod_cidrs)?;
        }
        if let Some(a) = &self.tunnel_addrs {
            rec.tunnel_addrs = a.apply(&base.tunnel_addrs)?;
        }
        Some(rec)
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.short.to_be_bytes());
        put_varint(out, self.base);
        put_varint(out, self.version.saturating_sub(self.base));
        let mut mask = 0;
        for (bit, present) in [
            (NAME, self.name.is_some()),
            (FLAGS, self.deleted.is_some()),
            (ZONE, self.zone.is_some()),
            (ENDPOINTS, self.endpoints.is_some()),
            (POD_CIDRS, self.pod_cidrs.is_some()),
            (TUNNEL_ADDRS, self.tunnel_addrs.is_some()),
        ] {
            if present {
                mask |= bit;
            }
        }
        out.push(mask);
        if let Some(n) = &self.name {
            put_str(out, n);
        }
        if let Some(d) = self.deleted {
            out.push(if d { REC_FLAG_DELETED } else { 0 });
        }
        if let Some(z) = &self.zone {
            put_str(out, z);
        }
        if let Some(e) = &self.endpoints {
            e.encode(out, put_endpoint);
        }
        if let Some(c) = &self.pod_cidrs {
            c.encode(out, put_cidr);
        }
        if let Some(a) = &self.tunnel_addrs {
            a.encode(out, put_ip);
        }
        out.extend_from_slice(&self.signature);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let short = u64::from_be_bytes(r.array::<8>()?);
        let base = r.varint()?;
        let step = r.varint()?;
        let version = match base.checked_add(step) {
            Some(v) if step > 0 => v,
            Some(_) | None => return Err(DecodeError::DeltaStep),
        };
        let mask = r.u8()?;
        if mask & !ALL != 0 {
            return Err(DecodeError::UnknownFlags(mask));
        }
        let has = |bit: u8| mask & bit != 0;
        let name = if has(NAME) { Some(r.name()?) } else { None };
        let deleted = if has(FLAGS) {
            match r.u8()? {
                0 => Some(false),
                REC_FLAG_DELETED => Some(true),
                other => return Err(DecodeError::UnknownFlags(other)),
            }
        } else {
            None
        };
        let zone = if has(ZONE) { Some(r.string()?) } else { None };
        let endpoints = if has(ENDPOINTS) {
            Some(ListEdit::decode(r, Reader::endpoint)?)
        } else {
            None
        };
        let pod_cidrs = if has(POD_CIDRS) {
            Some(ListEdit::decode(r, Reader::cidr)?)
        } else {
            None
        };
        let tunnel_addrs = if has(TUNNEL_ADDRS) {
            Some(ListEdit::decode(r, Reader::ip)?)
        } else {
            None
        };
        let signature = r.array::<SIG_LEN>()?;
        Ok(Delta {
            short,
            base,
            version,
            deleted,
            name,
            zone,
            endpoints,
            pod_cidrs,
            tunnel_addrs,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_edits_keep_the_unchanged_front_and_back() {
        check(&[1, 2, 3], &[1, 9, 3], 1, 1, &[9]);
        check(&[1, 2, 3], &[1, 2, 3, 4], 3, 0, &[4]);
        check(&[1, 2, 3], &[0, 1, 2, 3], 0, 3, &[0]);
        check(&[1, 2, 3], &[], 0, 0, &[]);
        check(&[], &[5], 0, 0, &[5]);
        check(&[7, 7], &[7, 7, 7], 2, 0, &[7]);
        assert_eq!(ListEdit::between(&[1, 2], &[1, 2]), None);
    }

    #[test]
    fn list_edit_that_does_not_fit_gives_none() {
        let e = ListEdit {
            keep_front: 2,
            keep_back: 2,
            middle: vec![0u8],
        };
        assert_eq!(e.apply(&[1, 2, 3]), None);
        let e = ListEdit {
            keep_front: u64::MAX,
            keep_back: 0,
            middle: vec![0u8],
        };
        assert_eq!(e.apply(&[1]), None);
    }

    fn check(old: &[u8], new: &[u8], front: u64, back: u64, middle: &[u8]) {
        let e = ListEdit::between(old, new).unwrap();
        assert_eq!(
            (e.keep_front, e.keep_back, &e.middle[..]),
            (front, back, middle)
        );
        assert_eq!(e.apply(old).as_deref(), Some(new), "{old:?} -> {new:?}");
    }
}
