//! The network configuration the runtime streams on stdin, parsed and validated.
//!
//! Parsing runs in three steps so that each failure gets the spec's code: bytes that are not
//! JSON are a decode failure (6); an unsupported `cniVersion` is code 1; a field of the wrong
//! type or value is an invalid config (7) whose details name the field. Unknown top-level fields
//! are ignored, as the spec lets runtimes add their own (`runtimeConfig`, `args`, ...); unknown
//! fields inside `ipam` are rejected (code 2) because there a typo silently changes allocation.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, Code};
use crate::result::CniResult;

/// Spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version, used for errors when the config's version is unknown.
pub const LATEST_VERSION: &str = "1.1.0";
/// Default path of mistnetd's API socket.
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/mistnet/mistnetd.sock";
/// Default directory of the IPAM store. It is on tmpfs on purpose: allocations must not outlive
/// the pods they belong to, and no pod network namespace survives a reboot, so a store that
/// vanishes at boot cannot leak addresses (host-local's classic failure). It survives restarts
/// of the daemon and of the container runtime.
pub const DEFAULT_DATA_DIR: &str = "/run/mistnet";

/// A validated network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// The config's `cniVersion` (one of [`SUPPORTED_VERSIONS`]).
    pub cni_version: Version,
    /// Network name; the IPAM store is kept per network.
    pub name: String,
    /// Path of the node state file written by mistnetd.
    pub node_state_file: PathBuf,
    /// mistnetd's API socket, used to hand veth deletion to the daemon (DEL falls back to
    /// deleting in-process when the daemon is not there).
    pub daemon_socket: PathBuf,
    /// Root of the plugin's persistent data (IPAM store under `ipam/<name>/`).
    pub data_dir: PathBuf,
    /// Pod interface MTU; overrides the node state's MTU when set.
    pub mtu: Option<u32>,
    /// IPAM overrides.
    pub ipam: IpamConf,
    /// DNS settings copied into the result.
    pub dns: Option<Value>,
    /// Result of the previous plugin in the chain (ADD) or of the last ADD (CHECK, DEL).
    pub prev_result: Option<CniResult>,
    /// GC: the attachments that are still valid; every other allocation is released.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// A spec version this plugin supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    /// Parses a supported version string.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "0.3.0" => Some(Self::V0_3_0),
            "0.3.1" => Some(Self::V0_3_1),
            "0.4.0" => Some(Self::V0_4_0),
            "1.0.0" => Some(Self::V1_0_0),
            "1.1.0" => Some(Self::V1_1_0),
            _ => None,
        }
    }

    /// The version as written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Results of this version carry `version` in every IP entry (0.3.x and 0.4.0).
    pub fn ips_have_version(self) -> bool {
        self < Self::V1_0_0
    }
}

/// One (container, interface) attachment, as listed in `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The `ipam` section: mistnet's node-local IPAM, optionally narrowed by the operator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConf {
    /// Must be absent or "mistnet": IPAM is built in and not delegated.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// host-local style range sets; each set is one address family. Replaces the node's pod
    /// CIDRs for that family when given.
    #[serde(default)]
    pub ranges: Vec<Vec<RangeConf>>,
    /// Addresses never handed out: single IPs, `a-b` ranges or CIDRs.
    #[serde(default)]
    pub reserved: Vec<String>,
}

/// One range of a range set.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeConf {
    pub subnet: IpNet,
    pub range_start: Option<IpAddr>,
    pub range_end: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    node_state_file: Option<PathBuf>,
    daemon_socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    mtu: Option<u32>,
    #[serde(default)]
    ipam: Option<Value>,
    dns: Option<Value>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// Reads the `cniVersion` of a config without validating anything else (for error output).
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

impl NetConf {
    /// Parses and validates the config bytes from stdin.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::with_source(Code::DecodeFailure, "failed to decode network config", &e)
        })?;
        let Some(obj) = value.as_object() else {
            return Err(CniError::new(
                Code::DecodeFailure,
                "failed to decode network config",
                "expected a JSON object",
            ));
        };
        let version_str = match obj.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "invalid network config",
                    "cniVersion: must be a string",
                ));
            }
            None => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "invalid network config",
                    "cniVersion: missing",
                ));
            }
        };
        let Some(cni_version) = Version::parse(&version_str) else {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI versions",
                format!(
                    "config is \"{version_str}\", plugin supports [{}]",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        };
        let raw: RawConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(Code::InvalidConfig, "invalid network config", e.to_string())
        })?;

        validate_name(&raw.name)?;
        if raw.kind.is_empty() {
            return Err(invalid("type: must not be empty"));
        }
        if let Some(mtu) = raw.mtu
            && !(crate::node_state::MIN_MTU..=65535).contains(&mtu)
        {
            return Err(invalid(format!("mtu: {mtu} is outside 576..=65535")));
        }
        let ipam = match raw.ipam {
            None | Some(Value::Null) => IpamConf::default(),
            Some(v) => parse_ipam(v)?,
        };
        if let Some(dns) = &raw.dns
            && !dns.is_object()
        {
            return Err(invalid("dns: must be an object"));
        }
        let prev_result = match raw.prev_result {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_value(&v).map_err(|e| {
                CniError::new(Code::InvalidConfig, "invalid prevResult", e.to_string())
            })?),
        };
        Ok(Self {
            cni_version,
            name: raw.name,
            node_state_file: raw
                .node_state_file
                .unwrap_or_else(|| PathBuf::from(crate::node_state::DEFAULT_PATH)),
            daemon_socket: raw
                .daemon_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_SOCKET)),
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            mtu: raw.mtu,
            ipam,
            dns: raw.dns,
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }

    /// Directory of this network's IPAM store.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join("ipam").join(&self.name)
    }
}

fn parse_ipam(v: Value) -> Result<IpamConf, CniError> {
    let ipam: IpamConf = serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let code = if msg.contains("unknown field") {
            Code::UnsupportedField
        } else {
            Code::InvalidConfig
        };
        CniError::new(code, "invalid ipam config", format!("ipam: {msg}"))
    })?;
    if let Some(kind) = &ipam.kind
        && kind != "mistnet"
    {
        return Err(CniError::new(
            Code::UnsupportedField,
            "unsupported ipam type",
            format!(
                "ipam.type: \"{kind}\" (mistnet allocates itself; omit ipam.type or use \"mistnet\")"
            ),
        ));
    }
    for (i, set) in ipam.ranges.iter().enumerate() {
        let Some(first) = set.first() else {
            return Err(invalid(format!("ipam.ranges[{i}]: empty range set")));
        };
        let v4 = first.subnet.addr().is_ipv4();
        for (j, r) in set.iter().enumerate() {
            let at = format!("ipam.ranges[{i}][{j}]");
            if r.subnet.addr().is_ipv4() != v4 {
                return Err(invalid(format!(
                    "{at}: a range set must hold one address family"
                )));
            }
            if r.subnet.trunc() != r.subnet {
                return Err(invalid(format!(
                    "{at}.subnet: {} has host bits set",
                    r.subnet
                )));
            }
            for (field, addr) in [("rangeStart", r.range_start), ("rangeEnd", r.range_end)] {
                if let Some(a) = addr
                    && !r.subnet.contains(&a)
                {
                    return Err(invalid(format!(
                        "{at}.{field}: {a} is outside {}",
                        r.subnet
                    )));
                }
            }
            if let (Some(s), Some(e)) = (r.range_start, r.range_end)
                && s > e
            {
                return Err(invalid(format!(
                    "{at}: rangeStart {s} is after rangeEnd {e}"
                )));
            }
        }
        if ipam.ranges[..i].iter().any(|other| {
            other
                .first()
                .is_some_and(|o| o.subnet.addr().is_ipv4() == v4)
        }) {
            return Err(invalid(format!(
                "ipam.ranges[{i}]: at most one range set per address family"
            )));
        }
    }
    for (i, r) in ipam.reserved.iter().enumerate() {
        crate::ipam::parse_reserved(r)
            .map_err(|e| invalid(format!("ipam.reserved[{i}]: \"{r}\": {e}")))?;
    }
    Ok(ipam)
}

fn validate_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "name: \"{name}\" must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        )))
    }
}

fn invalid(details: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, "invalid network config", details)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    fn code(s: &str) -> u32 {
        parse(s).unwrap_err().code.as_u32()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"{"cniVersion":"1.1.0","name":"mistnet","type":"mistnet"}"#).unwrap();
        assert_eq!(c.cni_version, Version::V1_1_0);
        assert_eq!(c.node_state_file, PathBuf::from("/run/mistnet/node.json"));
        assert_eq!(c.ipam_dir(), PathBuf::from("/run/mistnet/ipam/mistnet"));
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn every_supported_version_parses() {
        for v in SUPPORTED_VERSIONS {
            let c = parse(&format!(
                r#"{{"cniVersion":"{v}","name":"n","type":"mistnet"}}"#
            ))
            .unwrap();
            assert_eq!(c.cni_version.as_str(), *v);
        }
    }

    #[test]
    fn malformed_json_is_decode_failure() {
        assert_eq!(code("{not json"), 6);
        assert_eq!(code(""), 6);
        assert_eq!(code("[1,2]"), 6);
    }

    #[test]
    fn unknown_version_is_code_1() {
        assert_eq!(
            code(r#"{"cniVersion":"0.2.0","name":"n","type":"mistnet"}"#),
            1
        );
        assert_eq!(
            code(r#"{"cniVersion":"9.9.9","name":"n","type":"mistnet"}"#),
            1
        );
    }

    #[test]
    fn missing_or_mistyped_fields_are_invalid_config() {
        assert_eq!(code(r#"{"name":"n","type":"mistnet"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":1,"name":"n","type":"mistnet"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.1.0","type":"mistnet"}"#), 7);
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","mtu":"x"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","mtu":100}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"-bad","type":"mistnet"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"a b","type":"mistnet"}"#),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","dns":[]}"#),
            7
        );
    }

    #[test]
    fn error_details_name_the_field() {
        let e =
            parse(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","mtu":"x"}"#).unwrap_err();
        assert!(
            e.details.contains("mtu") || e.details.contains("u32"),
            "{e}"
        );
        let e = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet",
                "ipam":{"ranges":[[{"subnet":"10.1.0.0/24","rangeStart":"10.2.0.1"}]]}}"#,
        )
        .unwrap_err();
        assert!(e.details.contains("ipam.ranges[0][0].rangeStart"), "{e}");
    }

    #[test]
    fn unknown_top_level_fields_are_ignored() {
        parse(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","runtimeConfig":{},"args":{"x":1}}"#)
            .unwrap();
    }

    #[test]
    fn ipam_unknown_field_and_delegation_are_unsupported() {
        assert_eq!(
            code(
                r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"subnet":"10.0.0.0/8"}}"#
            ),
            2
        );
        assert_eq!(
            code(
                r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"type":"host-local"}}"#
            ),
            2
        );
    }

    #[test]
    fn ipam_ranges_and_reserved_validate() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{
                "ranges":[[{"subnet":"10.9.0.0/24","rangeStart":"10.9.0.10","rangeEnd":"10.9.0.20"}],
                          [{"subnet":"fd00::/120"}]],
                "reserved":["10.9.0.11","10.9.0.12-10.9.0.13","fd00::/126"]}}"#,
        )
        .unwrap();
        assert_eq!(c.ipam.ranges.len(), 2);
        assert_eq!(
            code(
                r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"ranges":[[{"subnet":"10.9.0.1/24"}]]}}"#
            ),
            7
        );
        assert_eq!(
            code(
                r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"ranges":[[{"subnet":"10.9.0.0/24"}],[{"subnet":"10.8.0.0/24"}]]}}"#
            ),
            7
        );
        assert_eq!(
            code(
                r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"reserved":["nope"]}}"#
            ),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet","ipam":{"ranges":[[]]}}"#),
            7
        );
    }

    #[test]
    fn valid_attachments_parse() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"mistnet",
                "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
