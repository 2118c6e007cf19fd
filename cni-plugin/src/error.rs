//! CNI errors: the spec's well-known codes plus mistnet's own (100+), printed as the spec's JSON.

use std::fmt;

use serde::Serialize;

/// A CNI error code (SPEC.md "Well-known Error Codes"; 100 and above are plugin-specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: the config's cniVersion is not supported, or the verb does not exist in it.
    IncompatibleVersion,
    /// 2: a field of the network configuration is not supported.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: an I/O failure (store, sysctl, netlink).
    IoFailure,
    /// 6: stdin could not be decoded.
    DecodeFailure,
    /// 7: the network configuration is invalid.
    InvalidConfig,
    /// 11: a transient condition; the runtime should retry later.
    TryAgainLater,
    /// 50: STATUS: the plugin cannot serve ADD now.
    NotAvailable,
    /// 100: CHECK found the container's networking differs from what ADD set up.
    Drift,
    /// 101: ADD was called for an attachment that already exists.
    AlreadyExists,
}

impl Code {
    /// The numeric code printed in the error JSON.
    pub fn as_u32(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::UnknownContainer => 3,
            Code::InvalidEnvironment => 4,
            Code::IoFailure => 5,
            Code::DecodeFailure => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
            Code::Drift => 100,
            Code::AlreadyExists => 101,
        }
    }
}

/// An error as the CNI spec describes it: a code, a short message and optional details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// Builds an error with a short message and a longer explanation.
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Builds an error from a short message and a source error, whose whole cause chain becomes
    /// the details.
    pub fn with_source(
        code: Code,
        msg: impl Into<String>,
        source: &(dyn std::error::Error + 'static),
    ) -> Self {
        let mut details = source.to_string();
        let mut cur = source.source();
        while let Some(e) = cur {
            details.push_str(": ");
            details.push_str(&e.to_string());
            cur = e.source();
        }
        Self::new(code, msg, details)
    }

    /// The JSON the plugin prints on stdout for this error.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code.as_u32(),
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"{cni_version}\",\"code\":{},\"msg\":\"internal error\"}}",
                self.code.as_u32()
            )
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code.as_u32())?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(Code::InvalidConfig, "bad config", "field x");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad config");
        assert_eq!(v["details"], "field x");
    }

    #[test]
    fn empty_details_are_omitted() {
        let e = CniError::new(Code::NotAvailable, "no node state", "");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert!(v.get("details").is_none());
        assert_eq!(v["code"], 50);
    }
}
