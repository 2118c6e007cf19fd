//! CNI ADD/DEL latency: `mistnet` against the reference `bridge` + `host-local`, side by side.
//!
//! Both plugins run in the same benchmark node namespace, alternating iteration by iteration so
//! that machine noise hits both alike; every iteration uses a fresh pod namespace (created and
//! removed outside the timed region). Timing covers what a runtime pays: spawning the plugin,
//! feeding stdin, waiting for its exit. Needs root.
//!
//! Usage: `cni-latency [--iterations N] [--json] [--mistnet PATH] [--cni-path DIR]`

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

struct Args {
    iterations: usize,
    json: bool,
    mistnet: String,
    cni_path: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        iterations: 200,
        json: false,
        mistnet: default_mistnet(),
        cni_path: "/usr/lib/cni".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iterations" | "-n" => {
                args.iterations = it
                    .next()
                    .context("--iterations needs a value")?
                    .parse()
                    .context("--iterations: not a number")?;
            }
            "--json" => args.json = true,
            "--mistnet" => args.mistnet = it.next().context("--mistnet needs a path")?,
            "--cni-path" => args.cni_path = it.next().context("--cni-path needs a directory")?,
            "-h" | "--help" => {
                eprintln!(
                    "usage: cni-latency [--iterations N] [--json] [--mistnet PATH] [--cni-path DIR]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(args.iterations > 0, "--iterations must be positive");
    Ok(args)
}

fn default_mistnet() -> String {
    // Next to this binary in the same target directory.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mistnet")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "mistnet".into())
}

/// A namespace deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: String) -> Result<Self> {
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .context("running ip")?;
        ensure!(st.success(), "ip netns add {name} failed");
        Ok(Ns(name))
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Plugin {
    label: &'static str,
    bin: String,
    conf: String,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn call(p: &Plugin, cmd: &str, cid: &str, netns: &str, cni_path: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(&p.bin)
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", p.bin))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(p.conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    ensure!(
        out.status.success(),
        "{} {cmd} failed: {}{}",
        p.label,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[idx.min(s.len() - 1)]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "cni-latency creates network namespaces: run it as root"
    );
    for p in ["bridge", "host-local"] {
        let path = format!("{}/{p}", args.cni_path);
        ensure!(
            std::path::Path::new(&path).exists(),
            "{path} missing: run scripts/setup.sh"
        );
    }
    ensure!(
        std::path::Path::new(&args.mistnet).exists(),
        "{} missing: build with cargo build --release -p mistnet-cni",
        args.mistnet
    );

    let tag = format!("cb{}", std::process::id());
    let node = Ns::new(format!("{tag}-node"))?;
    // Each plugin keeps its IPAM store where it does by default: mistnet on tmpfs (/run),
    // host-local on disk (/var/lib/cni/networks; here a temp dir on the same disk).
    let dir = tempfile_dir(&tag)?;
    let run_dir = format!("/run/mistnet-{tag}");
    std::fs::write(
        format!("{dir}/node.json"),
        json!({"version":1,"nodeName":"bench","podCidrs":["10.251.0.0/16"],"mtu":1420}).to_string(),
    )?;
    // Enter the node namespace: every plugin spawned from here runs in it.
    let f = std::fs::File::open(node.path())?;
    // SAFETY: setns on a namespace fd we own; the process is single-threaded here.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    ensure!(
        rc == 0,
        "setns into the bench namespace failed: {}",
        std::io::Error::last_os_error()
    );

    let mut plugins = [
        Plugin {
            label: "mistnet",
            bin: args.mistnet.clone(),
            conf: json!({"cniVersion":"1.0.0","name":"mistbench","type":"mistnet",
                         "nodeStateFile": format!("{dir}/node.json"), "dataDir": format!("{run_dir}/mistnet")})
            .to_string(),
            add: Vec::new(),
            del: Vec::new(),
        },
        Plugin {
            label: "bridge+host-local",
            bin: format!("{}/bridge", args.cni_path),
            conf: json!({"cniVersion":"1.0.0","name":"refbench","type":"bridge","bridge":"cnibench0",
                         "isGateway":true,"ipMasq":false,
                         "ipam":{"type":"host-local","subnet":"10.252.0.0/16","dataDir": format!("{dir}/host-local")}})
            .to_string(),
            add: Vec::new(),
            del: Vec::new(),
        },
    ];
    // Warm-up: page cache, the bridge device, the IPAM stores.
    for p in &plugins {
        let ns = Ns::new(format!("{tag}-w"))?;
        call(p, "ADD", "warm", &ns.path(), &args.cni_path)?;
        call(p, "DEL", "warm", &ns.path(), &args.cni_path)?;
    }
    for i in 0..args.iterations {
        // Alternate which plugin goes first so neither always runs on a just-woken machine.
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for &k in &order {
            let ns = Ns::new(format!("{tag}-{i}-{k}"))?;
            let cid = format!("bench{i}");
            let p = &mut plugins[k];
            let add = call(p, "ADD", &cid, &ns.path(), &args.cni_path)?;
            let del = call(p, "DEL", &cid, &ns.path(), &args.cni_path)?;
            p.add.push(add);
            p.del.push(del);
        }
        if !args.json && i % 20 == 19 {
            eprint!("\r{}/{} iterations", i + 1, args.iterations);
        }
    }
    if !args.json {
        eprintln!();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&run_dir);

    let stats = |p: &Plugin| {
        json!({
            "add_ms": {"p50": pct(&p.add, 0.5), "p95": pct(&p.add, 0.95), "p99": pct(&p.add, 0.99)},
            "del_ms": {"p50": pct(&p.del, 0.5), "p95": pct(&p.del, 0.95), "p99": pct(&p.del, 0.99)},
        })
    };
    let (m, r) = (&plugins[0], &plugins[1]);
    let ratio_add = pct(&m.add, 0.5) / pct(&r.add, 0.5);
    let ratio_del = pct(&m.del, 0.5) / pct(&r.del, 0.5);
    if args.json {
        let doc = json!({"iterations": args.iterations, "mistnet": stats(m), "reference": stats(r),
                         "ratio_p50": {"add": ratio_add, "del": ratio_del}});
        writeln!(std::io::stdout(), "{doc:#}")?;
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "CNI latency, {} iterations each, fresh netns per iteration (ms)",
        args.iterations
    )?;
    writeln!(
        out,
        "{:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "plugin", "ADD p50", "p95", "p99", "DEL p50", "p95", "p99"
    )?;
    for p in [m, r] {
        writeln!(
            out,
            "{:<20} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            p.label,
            pct(&p.add, 0.5),
            pct(&p.add, 0.95),
            pct(&p.add, 0.99),
            pct(&p.del, 0.5),
            pct(&p.del, 0.95),
            pct(&p.del, 0.99)
        )?;
    }
    writeln!(
        out,
        "ratio mistnet/reference (p50): ADD {ratio_add:.2}x  DEL {ratio_del:.2}x"
    )?;
    Ok(())
}

fn tempfile_dir(tag: &str) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("mistnet-{tag}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.display().to_string())
}
