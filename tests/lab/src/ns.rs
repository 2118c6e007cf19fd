//! Network namespaces and commands run inside them, through iproute2.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command and returns its stdout; fails with the command's stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and returns its whole output, whatever its status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))
}

/// `ip` with arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Creates a named network namespace with `lo` up.
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).with_context(|| format!("creating namespace {name}"))?;
    exec(name, &["ip", "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named namespace; a missing one is fine.
pub fn del(name: &str) {
    let _ = output(Command::new("ip").args(["netns", "del", name]));
}

/// Every named namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(out) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// A command prepared to run inside a namespace.
pub fn command(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c
}

/// Runs a command inside a namespace, returning stdout.
pub fn exec(ns: &str, argv: &[&str]) -> Result<String> {
    run(&mut command(ns, argv)).with_context(|| format!("in namespace {ns}"))
}

/// Runs a shell snippet inside a namespace, returning stdout.
pub fn sh(ns: &str, script: &str) -> Result<String> {
    exec(ns, &["sh", "-c", script])
}

/// The path of a named namespace, as CNI_NETNS wants it.
pub fn path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}
