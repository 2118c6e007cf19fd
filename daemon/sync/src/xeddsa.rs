//! XEdDSA (Signal's specification, <https://signal.org/docs/specifications/xeddsa/>): ed25519
//! signatures made with a node's X25519 (WireGuard) key pair, so a node holds one key.
//!
//! - The identity of a WireGuard public key `u` is the Edwards point that is its birational
//!   image with sign bit 0 ([`identity_of`]). Every valid X25519 public key has exactly one.
//! - The signing scalar is the clamped X25519 private key reduced mod the group order, negated
//!   when its Edwards point has sign bit 1, so that `a·B` is that identity ([`KeyPair`]).
//! - A signature is `R || s` with `h = SHA-512(R || A || M)`, exactly an ed25519 signature, so
//!   plain ed25519 verification against the identity checks it ([`verify`]).
//! - The nonce is the spec's `r = SHA-512(0xFE || 0xFF×31 || a || M || Z) mod q`. `Z` is
//!   derived from the key and the message (`SHA-512("mistnet xeddsa Z\0" || a || M)`) rather
//!   than drawn at random: `r` stays secret and distinct per message because `a` is secret (the
//!   argument behind RFC 8032's deterministic nonces), the pure core has no entropy source, and
//!   a record's signed bytes become a function of its content (equal content at an equal
//!   version is never mistaken for equivocation). What random `Z` adds in the spec is
//!   resistance to fault and side-channel attacks on the signing device; an attacker able to
//!   mount those on a node can read its key file.
//!
//! Why reusing the key is sound: XEdDSA was designed for exactly this, signing with the X25519
//! key that also does Diffie-Hellman (Signal's identity keys). The WireGuard key agreement
//! (Noise IK) only ever uses the key for X25519, the signatures only for XEdDSA, and the two
//! uses hash disjoint inputs.

use curve25519_dalek::constants::ED25519_BASEPOINT_TABLE;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha512};

/// Length of a signature.
pub const SIG_LEN: usize = 64;
/// Domain separation of the deterministic `Z`.
const Z_CONTEXT: &[u8] = b"mistnet xeddsa Z\0";

/// A node's signing key: its X25519 private key, seen as an Edwards scalar.
#[derive(Clone)]
pub struct KeyPair {
    /// `a`: the clamped private key mod q, negated if needed so that `a·B` has sign bit 0.
    scalar: Scalar,
    /// `A = a·B`, compressed (sign bit 0).
    identity: [u8; 32],
    /// The X25519 public key (`clamp(k)·B` on the Montgomery curve).
    wg_public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the scalar.
        f.debug_struct("KeyPair")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// The key pair of an X25519 private key (clamped here as X25519 does, so any 32 bytes
    /// give the key pair WireGuard uses).
    pub fn from_x25519_secret(secret: [u8; 32]) -> Self {
        let k = Scalar::from_bytes_mod_order(clamp_integer(secret));
        let e = (ED25519_BASEPOINT_TABLE * &k).compress();
        let negative = e.as_bytes()[31] >> 7 == 1;
        let scalar = if negative { -k } else { k };
        let mut identity = e.to_bytes();
        identity[31] &= 0x7f;
        KeyPair {
            scalar,
            identity,
            wg_public: MontgomeryPoint::mul_base_clamped(secret).to_bytes(),
        }
    }

    /// The ed25519 public key: [`identity_of`] the WireGuard public key.
    pub fn identity(&self) -> [u8; 32] {
        self.identity
    }

    /// The X25519 (WireGuard) public key.
    pub fn wg_public(&self) -> [u8; 32] {
        self.wg_public
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIG_LEN] {
        let a = self.scalar.to_bytes();
        let z: [u8; 64] = Sha512::new()
            .chain_update(Z_CONTEXT)
            .chain_update(a)
            .chain_update(msg)
            .finalize()
            .into();
        let mut prefix = [0xffu8; 32];
        prefix[0] = 0xfe;
        let r = wide_scalar(
            Sha512::new()
                .chain_update(prefix)
                .chain_update(a)
                .chain_update(msg)
                .chain_update(z),
        );
        let big_r = (ED25519_BASEPOINT_TABLE * &r).compress();
        let h = wide_scalar(
            Sha512::new()
                .chain_update(big_r.as_bytes())
                .chain_update(self.identity)
                .chain_update(msg),
        );
        let s = r + h * self.scalar;
        let mut sig = [0u8; SIG_LEN];
        sig[..32].copy_from_slice(big_r.as_bytes());
        sig[32..].copy_from_slice(s.as_bytes());
        sig
    }
}

/// The identity (ed25519 public key) of a WireGuard public key: the birational image of the
/// Montgomery `u` with sign bit 0. `None` for keys no X25519 key pair has: a non-canonical
/// `u` (≥ 2²⁵⁵ − 19 or the top bit set, which would give two encodings one identity), a point
/// on the twist, or a point of small order (anyone could forge signatures for it).
pub fn identity_of(wg_public: &[u8; 32]) -> Option<[u8; 32]> {
    if !canonical_u(wg_public) {
        return None;
    }
    let e = MontgomeryPoint(*wg_public).to_edwards(0)?;
    if e.is_small_order() {
        return None;
    }
    Some(e.compress().to_bytes())
}

/// Whether `sig` is a valid signature of `msg` by `identity` (plain ed25519 verification).
pub fn verify(identity: &[u8; 32], msg: &[u8], sig: &[u8; SIG_LEN]) -> bool {
    VerifyingKey::from_bytes(identity)
        .is_ok_and(|vk| vk.verify(msg, &Signature::from_bytes(sig)).is_ok())
}

fn wide_scalar(h: Sha512) -> Scalar {
    let wide: [u8; 64] = h.finalize().into();
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// `u < 2²⁵⁵ − 19` (little endian): the only encoding X25519 implementations produce.
fn canonical_u(u: &[u8; 32]) -> bool {
    let [low, middle @ .., top] = u;
    match *top {
        0x80..=0xff => false,
        0x7f => !(middle.iter().all(|b| *b == 0xff) && *low >= 0xed),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    #[test]
    fn signature_round_trips_and_rejects_other_keys_and_flipped_bits() {
        let key = KeyPair::from_x25519_secret([7; 32]);
        let other = KeyPair::from_x25519_secret([8; 32]);
        let msg = b"mistnet record";
        let sig = key.sign(msg);
        assert!(verify(&key.identity(), msg, &sig));
        assert!(!verify(&other.identity(), msg, &sig), "another key");
        assert!(
            !verify(&key.identity(), msg, &other.sign(msg)),
            "by another key"
        );
        assert!(
            !verify(&key.identity(), b"mistnet recorD", &sig),
            "another message"
        );
        for bit in [0, 255, 256, 511] {
            let mut bad = sig;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!verify(&key.identity(), msg, &bad), "bit {bit} flipped");
        }
        // Deterministic: the same message gives the same bytes.
        assert_eq!(key.sign(msg), sig);
    }

    #[test]
    fn both_signs_of_the_edwards_point_sign_and_verify() {
        let mut seen = [false; 2];
        for i in 0..32u8 {
            let secret = [i; 32];
            let key = KeyPair::from_x25519_secret(secret);
            let e = (ED25519_BASEPOINT_TABLE
                * &Scalar::from_bytes_mod_order(clamp_integer(secret)))
                .compress();
            seen[usize::from(e.as_bytes()[31] >> 7)] = true;
            let sig = key.sign(&[i]);
            assert!(verify(&key.identity(), &[i], &sig));
            // Strict verification (canonical R and A, no small-order components) holds too.
            let vk = VerifyingKey::from_bytes(&key.identity()).unwrap();
            vk.verify_strict(&[i], &Signature::from_bytes(&sig))
                .unwrap();
        }
        assert_eq!(seen, [true, true], "keys of both signs were tested");
    }

    #[test]
    fn identity_from_the_public_key_equals_the_one_from_the_private_key() {
        for i in 0..16u8 {
            let key = KeyPair::from_x25519_secret([i.wrapping_mul(37); 32]);
            assert_eq!(identity_of(&key.wg_public()), Some(key.identity()));
        }
    }

    #[test]
    fn identity_matches_the_edwards_point_of_the_clamped_scalar() {
        // Montgomery ladder + birational map on one side, Edwards base-point multiplication on
        // the other: the same point up to the sign bit.
        let secret = [0x42; 32];
        let wg = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        let mut expected = curve25519_dalek::EdwardsPoint::mul_base_clamped(secret)
            .compress()
            .to_bytes();
        expected[31] &= 0x7f;
        assert_eq!(identity_of(&wg), Some(expected));
    }

    #[test]
    fn known_answer_from_rfc8032() {
        // RFC 8032 §7.1 TEST 1. An ed25519 key's scalar is clamp(SHA-512(seed)[..32]); used as
        // an X25519 private key it must map back to the published public key (its sign bit
        // is 0), and XEdDSA signatures made with it verify under that key.
        let seed = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let public = hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let h: [u8; 64] = Sha512::digest(seed).into();
        let mut k = [0u8; 32];
        k.copy_from_slice(&h[..32]);
        let key = KeyPair::from_x25519_secret(k);
        assert_eq!(key.identity(), public);
        assert_eq!(identity_of(&key.wg_public()), Some(public));
        assert_eq!(
            SigningKey::from_bytes(&seed).verifying_key().to_bytes(),
            public
        );
        let sig = key.sign(b"xeddsa");
        assert!(verify(&public, b"xeddsa", &sig));
    }

    #[test]
    fn unusable_public_keys_have_no_identity() {
        let key = KeyPair::from_x25519_secret([9; 32]);
        let mut high = key.wg_public();
        high[31] |= 0x80;
        assert_eq!(identity_of(&high), None, "top bit set");
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert_eq!(identity_of(&p), None, "u = p");
        p[0] = 0xec;
        assert_eq!(identity_of(&p), None, "u = p - 1 = -1");
        assert_eq!(identity_of(&[0; 32]), None, "u = 0: small order");
        let mut one = [0; 32];
        one[0] = 1;
        assert_eq!(identity_of(&one), None, "u = 1: small order");
    }

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
