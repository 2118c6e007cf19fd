//! Link profiles: `key=value` specs, named presets and profile files.
//!
//! A spec is a space- or comma-separated list: `delay=50ms jitter=5ms reorder loss=10%
//! ge=1%,20%,0%,50% rate=10mbit queue=64kb dup=1% mtu=1400 down|up`, applied on top of a base
//! (a preset or the current parameters). `ge=p,r,good,bad` is Gilbert-Elliott loss with
//! good→bad probability p, bad→good probability r and the loss in each state.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use super::impair::{Loss, Params};

/// Why a value (`50ms`, `10%`, `10mbit`, `64kb`) did not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("{0:?} is not a number")]
    NotNumber(String),
    #[error("unknown unit {0:?}")]
    Unit(String),
    #[error("{0} is out of range")]
    Range(String),
}

/// Why a spec or a profile file was rejected; each names the offending token or entry.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("{token}")]
    Value {
        token: String,
        #[source]
        source: ValueError,
    },
    #[error(
        "{0}: unknown setting (delay, jitter, reorder, loss, ge, dup, rate, queue, mtu, up, down, ideal, profile)"
    )]
    UnknownSetting(String),
    #[error("{0}: unknown preset (try {list})", list = PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("{0}: ge needs four values p,r,loss_good,loss_bad")]
    GeArity(String),
    #[error("invalid profile file")]
    Toml(#[from] toml::de::Error),
    #[error("{key}")]
    Entry {
        key: String,
        #[source]
        source: Box<SpecError>,
    },
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &[
    "ideal",
    "wifi-good",
    "wifi-flaky",
    "lte",
    "lte-congested",
    "satellite",
    "partitioned",
];

/// A built-in preset (one direction; links use it both ways).
pub fn preset(name: &str) -> Option<Params> {
    let mbit = 1_000_000;
    let d = Params::default();
    Some(match name {
        "ideal" => d,
        "wifi-good" => Params {
            delay: ms(2),
            jitter: ms(1),
            loss: Loss::Bernoulli { p: 0.001 },
            rate_bps: 100 * mbit,
            ..d
        },
        "wifi-flaky" => Params {
            delay: ms(5),
            jitter: ms(5),
            loss: Loss::GilbertElliott {
                p: 0.02,
                r: 0.3,
                loss_good: 0.001,
                loss_bad: 0.5,
            },
            rate_bps: 20 * mbit,
            ..d
        },
        "lte" => Params {
            delay: ms(25),
            jitter: ms(8),
            loss: Loss::Bernoulli { p: 0.005 },
            rate_bps: 30 * mbit,
            queue_bytes: 256 * 1024,
            ..d
        },
        "lte-congested" => Params {
            delay: ms(60),
            jitter: ms(30),
            loss: Loss::Bernoulli { p: 0.02 },
            rate_bps: 5 * mbit,
            queue_bytes: 512 * 1024,
            ..d
        },
        "satellite" => Params {
            delay: ms(300),
            jitter: ms(10),
            loss: Loss::Bernoulli { p: 0.01 },
            rate_bps: 10 * mbit,
            queue_bytes: 1024 * 1024,
            ..d
        },
        "partitioned" => Params { up: false, ..d },
        _ => return None,
    })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Applies a spec on top of `base`; errors name the bad token.
pub fn apply(base: Params, spec: &str) -> Result<Params, SpecError> {
    let mut p = base;
    for tok in spec
        .split(|c: char| c.is_whitespace())
        .filter(|t| !t.is_empty())
    {
        let (k, v) = tok.split_once('=').unwrap_or((tok, ""));
        match k {
            "ideal" => p = Params::default(),
            "up" => p.up = true,
            "down" => p.up = false,
            "reorder" => p.reorder = v != "off" && v != "false",
            "profile" | "preset" => {
                p = preset(v).ok_or_else(|| SpecError::UnknownPreset(tok.to_owned()))?;
            }
            "delay" => p.delay = duration(v).map_err(bad(tok))?,
            "jitter" => p.jitter = duration(v).map_err(bad(tok))?,
            "loss" => {
                let f = percent(v).map_err(bad(tok))?;
                p.loss = if f > 0.0 {
                    Loss::Bernoulli { p: f }
                } else {
                    Loss::None
                };
            }
            "ge" => {
                let parts: Vec<&str> = v.split(',').collect();
                let [a, b, c, d] = parts.as_slice() else {
                    return Err(SpecError::GeArity(tok.to_owned()));
                };
                p.loss = Loss::GilbertElliott {
                    p: percent(a).map_err(bad(tok))?,
                    r: percent(b).map_err(bad(tok))?,
                    loss_good: percent(c).map_err(bad(tok))?,
                    loss_bad: percent(d).map_err(bad(tok))?,
                };
            }
            "dup" | "duplicate" => p.duplicate = percent(v).map_err(bad(tok))?,
            "rate" => p.rate_bps = rate(v).map_err(bad(tok))?,
            "queue" => p.queue_bytes = bytes(v).map_err(bad(tok))?,
            "mtu" => {
                p.mtu = v.parse().map_err(|_| SpecError::Value {
                    token: tok.to_owned(),
                    source: ValueError::NotNumber(v.to_owned()),
                })?;
            }
            _ => return Err(SpecError::UnknownSetting(tok.to_owned())),
        }
    }
    Ok(p)
}

fn bad(tok: &str) -> impl Fn(ValueError) -> SpecError + '_ {
    move |source| SpecError::Value {
        token: tok.to_owned(),
        source,
    }
}

fn number(num: &str, v: &str) -> Result<f64, ValueError> {
    num.parse().map_err(|_| ValueError::NotNumber(v.to_owned()))
}

/// `50ms`, `1.5s`, `200us`, `0` (bare numbers are milliseconds).
pub fn duration(v: &str) -> Result<Duration, ValueError> {
    let (num, unit) = split_unit(v);
    let n = number(&num, v)?;
    let secs = match unit.as_str() {
        "s" => n,
        "ms" | "" => n / 1e3,
        "us" => n / 1e6,
        other => return Err(ValueError::Unit(other.to_owned())),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(ValueError::Range(v.to_owned()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `10%` or a fraction `0.1`.
pub fn percent(v: &str) -> Result<f64, ValueError> {
    let f = match v.strip_suffix('%') {
        Some(p) => number(p, v)? / 100.0,
        None => number(v, v)?,
    };
    if !(0.0..=1.0).contains(&f) {
        return Err(ValueError::Range(v.to_owned()));
    }
    Ok(f)
}

/// `10mbit`, `1gbit`, `500kbit`, `1000000` (bit/s).
pub fn rate(v: &str) -> Result<u64, ValueError> {
    let (num, unit) = split_unit(&v.to_ascii_lowercase());
    let n = number(&num, v)?;
    let mult = match unit.as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" | "k" => 1e3,
        "mbit" | "m" => 1e6,
        "gbit" | "g" => 1e9,
        other => return Err(ValueError::Unit(other.to_owned())),
    };
    Ok((n * mult) as u64)
}

/// `64kb`, `1mb`, `1500` (bytes; k/m/g are powers of 1024).
pub fn bytes(v: &str) -> Result<u64, ValueError> {
    let (num, unit) = split_unit(&v.to_ascii_lowercase());
    let n = number(&num, v)?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" | "kib" => 1024.0,
        "mb" | "m" | "mib" => 1024.0 * 1024.0,
        "gb" | "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(ValueError::Unit(other.to_owned())),
    };
    Ok((n * mult) as u64)
}

fn split_unit(v: &str) -> (String, String) {
    let i = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    (v[..i].to_owned(), v[i..].to_owned())
}

/// The spec that rebuilds `p` from defaults (shown by `emulate stats`).
pub fn describe(p: &Params) -> String {
    let d = Params::default();
    let mut out = Vec::new();
    if !p.up {
        out.push("down".to_owned());
    }
    if p.delay != d.delay {
        out.push(format!("delay={}", fmt_duration(p.delay)));
    }
    if p.jitter != d.jitter {
        out.push(format!("jitter={}", fmt_duration(p.jitter)));
    }
    if p.reorder {
        out.push("reorder".to_owned());
    }
    match p.loss {
        Loss::None => {}
        Loss::Bernoulli { p } => out.push(format!("loss={}%", p * 100.0)),
        Loss::GilbertElliott {
            p,
            r,
            loss_good,
            loss_bad,
        } => {
            out.push(format!(
                "ge={}%,{}%,{}%,{}%",
                p * 100.0,
                r * 100.0,
                loss_good * 100.0,
                loss_bad * 100.0
            ));
        }
    }
    if p.duplicate > 0.0 {
        out.push(format!("dup={}%", p.duplicate * 100.0));
    }
    if p.rate_bps > 0 {
        out.push(format!("rate={}", fmt_rate(p.rate_bps)));
    }
    if p.queue_bytes != d.queue_bytes {
        out.push(format!("queue={}", p.queue_bytes));
    }
    if p.mtu > 0 {
        out.push(format!("mtu={}", p.mtu));
    }
    if out.is_empty() {
        "ideal".to_owned()
    } else {
        out.join(" ")
    }
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

fn fmt_rate(bps: u64) -> String {
    match bps {
        b if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        b => b.to_string(),
    }
}

/// One namespace joined to the emulated network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Name of the network namespace (as in `ip netns`).
    pub netns: String,
    /// Addresses with prefix, e.g. `10.99.0.1/24`.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Interface name inside the namespace (default `nb0`).
    #[serde(default)]
    pub ifname: Option<String>,
    /// Interface MTU (default 1500).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// A scheduled change in a profile file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Time from start, e.g. `"5s"`.
    pub at: String,
    /// Repeat period, for flaps.
    #[serde(default)]
    pub every: Option<String>,
    /// Link selector: `a-b`, `a>b`, `a-*`, `*`, comma-separated.
    pub link: String,
    /// Settings, e.g. `"down"` or `"loss=50%"`.
    pub set: String,
}

/// A profile file: nodes, named profiles, per-link assignments and schedules.
///
/// ```toml
/// default = "wifi-good"
/// seed = 1
/// [nodes]
/// n1 = { netns = "lab-n1", addrs = ["10.99.0.1/24"] }
/// n2 = { netns = "lab-n2", addrs = ["10.99.0.2/24"], ifname = "wan0" }
/// n3 = { netns = "lab-n3", addrs = ["10.99.0.3/24"] }
/// [profiles]
/// field-lte = "profile=lte loss=3% jitter=20ms"
/// [links]
/// "n1-n2" = "field-lte"
/// "n1-n3" = "satellite"
/// "n2>n3" = "delay=80ms"          # one direction only
/// [[schedule]]
/// at = "10s"
/// every = "30s"
/// link = "n1-*"
/// set = "down"
/// ```
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub profiles: BTreeMap<String, String>,
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeEntry>,
    #[serde(default)]
    pub schedule: Vec<ScheduleEntry>,
}

impl ProfileFile {
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let f: ProfileFile = toml::from_str(text)?;
        let entry = |key: String| {
            move |e| SpecError::Entry {
                key,
                source: Box::new(e),
            }
        };
        for (name, spec) in &f.links {
            f.resolve(spec).map_err(entry(format!("links.{name:?}")))?;
        }
        if let Some(d) = &f.default {
            f.resolve(d).map_err(entry("default".to_owned()))?;
        }
        Ok(f)
    }

    /// A preset name, a name from `[profiles]`, or a spec.
    pub fn resolve(&self, s: &str) -> Result<Params, SpecError> {
        if let Some(spec) = self.profiles.get(s) {
            return apply(Params::default(), spec);
        }
        if let Some(p) = preset(s) {
            return Ok(p);
        }
        apply(Params::default(), s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs_parse() {
        let p = apply(
            Params::default(),
            "delay=50ms jitter=5ms loss=10% rate=10mbit queue=64kb dup=1% mtu=1400 reorder",
        )
        .unwrap();
        assert_eq!(p.delay, ms(50));
        assert_eq!(p.jitter, ms(5));
        assert_eq!(p.loss, Loss::Bernoulli { p: 0.1 });
        assert_eq!(p.rate_bps, 10_000_000);
        assert_eq!(p.queue_bytes, 65536);
        assert!((p.duplicate - 0.01).abs() < 1e-12);
        assert_eq!(p.mtu, 1400);
        assert!(p.reorder);
        let p = apply(p, "down").unwrap();
        assert!(!p.up);
        let ge = apply(Params::default(), "ge=1%,20%,0%,50%").unwrap();
        assert_eq!(
            ge.loss,
            Loss::GilbertElliott {
                p: 0.01,
                r: 0.2,
                loss_good: 0.0,
                loss_bad: 0.5
            }
        );
    }

    #[test]
    fn bad_specs_name_the_token() {
        for bad in [
            "delay=fast",
            "loss=120%",
            "ge=1,2",
            "rate=10furlongs",
            "bogus=1",
            "profile=mars",
        ] {
            let e = format!("{:#}", apply(Params::default(), bad).unwrap_err());
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn presets_exist_and_are_sane() {
        for name in PRESETS {
            let p = preset(name).unwrap();
            assert!(p.loss.mean() < 0.1, "{name}");
        }
        assert!(!preset("partitioned").unwrap().up);
        assert!(preset("satellite").unwrap().delay >= ms(250));
    }

    #[test]
    fn profile_files() {
        let f = ProfileFile::parse(
            r#"default = "wifi-good"
[profiles]
field-lte = "profile=lte loss=3%"
[links]
"n1-n2" = "field-lte"
"n2>n3" = "delay=80ms"
"#,
        )
        .unwrap();
        assert_eq!(
            f.resolve("field-lte").unwrap().loss,
            Loss::Bernoulli { p: 0.03 }
        );
        assert_eq!(f.resolve("delay=80ms").unwrap().delay, ms(80));
        assert!(ProfileFile::parse("[links]\n\"a-b\" = \"loss=200%\"\n").is_err());
        assert!(ProfileFile::parse("nonsense = 1\n").is_err());
        let f = ProfileFile::parse(
            r#"[nodes]
n1 = { netns = "a", addrs = ["10.0.0.1/24"] }
n2 = { netns = "b", ifname = "wan0", mtu = 1400 }
[[schedule]]
at = "5s"
every = "10s"
link = "n1-n2"
set = "down"
"#,
        )
        .unwrap();
        assert_eq!(f.nodes["n2"].ifname.as_deref(), Some("wan0"));
        assert_eq!(f.schedule[0].every.as_deref(), Some("10s"));
    }

    #[test]
    fn describe_round_trips() {
        for spec in [
            "delay=50ms jitter=5ms reorder loss=10% dup=1% rate=10mbit queue=64kb mtu=1400 down",
            "ge=1%,20%,0%,50%",
            "",
        ] {
            let p = apply(Params::default(), spec).unwrap();
            assert_eq!(
                apply(Params::default(), &describe(&p)).unwrap(),
                p,
                "{spec}"
            );
        }
        for name in PRESETS {
            let p = preset(name).unwrap();
            assert_eq!(
                apply(Params::default(), &describe(&p)).unwrap(),
                p,
                "{name}"
            );
        }
    }

    #[test]
    fn units() {
        assert_eq!(duration("1.5s").unwrap(), ms(1500));
        assert_eq!(duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(bytes("1mb").unwrap(), 1 << 20);
        assert_eq!(rate("1.5gbit").unwrap(), 1_500_000_000);
        assert!(duration("-1s").is_err());
        assert!(bytes("12parsecs").is_err());
    }
}
