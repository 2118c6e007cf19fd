//! A minimal container runtime's CNI side: runs a conflist's plugins the way libcni does.
//!
//! ADD runs the plugins in order, injecting the list's `name` and `cniVersion` and passing each
//! plugin the previous result as `prevResult`; DEL runs them in reverse with the cached ADD
//! result; CHECK in order with it. The result is cached next to the lab's state, as libcni
//! caches it under /var/lib/cni.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A conflist loaded from a file.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

impl ConfList {
    /// Reads a `.conflist` file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let name = v["name"]
            .as_str()
            .context("conflist: name missing")?
            .to_owned();
        let cni_version = v["cniVersion"]
            .as_str()
            .context("conflist: cniVersion missing")?
            .to_owned();
        let plugins = v["plugins"]
            .as_array()
            .context("conflist: plugins missing")?
            .clone();
        if plugins.is_empty() {
            bail!("conflist {}: no plugins", path.display());
        }
        Ok(Self {
            name,
            cni_version,
            plugins,
        })
    }

    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = Value::String(self.name.clone());
        c["cniVersion"] = Value::String(self.cni_version.clone());
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }
}

/// Where plugins run and are found.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Namespace the plugins run in (the node's "host" namespace).
    pub node_ns: String,
    /// Directories searched for plugin binaries (CNI_PATH).
    pub cni_path: Vec<PathBuf>,
}

/// What a plugin said when it failed.
#[derive(Debug, thiserror::Error)]
#[error("CNI {verb} failed in plugin {plugin}: {output}")]
pub struct PluginError {
    pub verb: String,
    pub plugin: String,
    pub output: String,
}

impl Runtime {
    fn find(&self, kind: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("CNI plugin {kind} not found in {:?}", self.cni_path))
    }

    fn call(
        &self,
        verb: &str,
        conf: &Value,
        container_id: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<Value> {
        let kind = conf["type"].as_str().context("plugin without type")?;
        let bin = self.find(kind)?;
        let cni_path = self
            .cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(&bin)
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(PluginError {
                verb: verb.into(),
                plugin: kind.into(),
                output: format!(
                    "{}{}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }
            .into());
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("{kind} {verb}: output is not JSON: {stdout}"))
    }

    /// ADD: every plugin in order; returns the final result. On failure runs DEL for all
    /// plugins, as the spec asks of runtimes.
    pub fn add(
        &self,
        list: &ConfList,
        container_id: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            match self.call(
                "ADD",
                &list.plugin_conf(p, prev.as_ref()),
                container_id,
                netns,
                ifname,
            ) {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let _ = self.del(list, container_id, netns, ifname, prev.as_ref());
                    return Err(e);
                }
            }
        }
        prev.context("no plugin returned a result")
    }

    /// CHECK: every plugin in order with the cached result.
    pub fn check(
        &self,
        list: &ConfList,
        container_id: &str,
        netns: &str,
        ifname: &str,
        result: &Value,
    ) -> Result<()> {
        for p in &list.plugins {
            self.call(
                "CHECK",
                &list.plugin_conf(p, Some(result)),
                container_id,
                netns,
                ifname,
            )?;
        }
        Ok(())
    }

    /// DEL: every plugin in reverse order; tries them all and reports the first failure.
    pub fn del(
        &self,
        list: &ConfList,
        container_id: &str,
        netns: &str,
        ifname: &str,
        result: Option<&Value>,
    ) -> Result<()> {
        let mut first = None;
        for p in list.plugins.iter().rev() {
            if let Err(e) = self.call(
                "DEL",
                &list.plugin_conf(p, result),
                container_id,
                netns,
                ifname,
            ) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
