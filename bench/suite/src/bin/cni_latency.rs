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
    // Enter the node namespace: every plugin spawned from here runs in it.
    let f = std::fs::File::open(node.path())?;
    // SAFETY: setns on a namespace fd we own; the process is single-threaded here.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    ensure!(
        rc == 0,
        "setns into the bench namespace failed: {}",
        std::io::Error::last_os_error()
    );

    // mistnetd runs on the benchmark node, as on every mistnet node: it writes the node state
    // and takes over veth deletion on DEL.
    let daemon_bin = std::path::Path::new(&args.mistnet).with_file_name("mistnetd");
    ensure!(
        daemon_bin.exists(),
        "{} missing: run scripts/build.sh",
        daemon_bin.display()
    );
    let sock = format!("{dir}/mistnetd.sock");
    std::fs::write(
        format!("{dir}/mistnetd.toml"),
        format!(
            "node_name = \"bench\"\nprivate_key_file = \"{dir}/key\"\npod_cidrs = [\"10.251.0.0/16\"]\nmtu = 1420\nnode_state_file = \"{dir}/node.json\"\napi_socket = \"{sock}\"\n"
        ),
    )?;
    let _ = std::fs::remove_file(format!("{dir}/node.json"));
    let _daemon = Daemon(
        Command::new(&daemon_bin)
            .args(["run", "--config", &format!("{dir}/mistnetd.toml")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mistnetd")?,
    );
    let mut ready = false;
    for _ in 0..250 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok()
            && std::path::Path::new(&format!("{dir}/node.json")).exists()
        {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(ready, "mistnetd did not start");
    let mistnet_conf = |socket: &str| {
        json!({"cniVersion":"1.0.0","name":"mistbench","type":"mistnet",
               "nodeStateFile": format!("{dir}/node.json"), "dataDir": format!("{run_dir}/mistnet"),
               "daemonSocket": socket})
        .to_string()
    };

    let mut plugins = [
        Plugin {
            label: "mistnet",
            bin: args.mistnet.clone(),
            conf: mistnet_conf(&sock),
            add: Vec::new(),
            del: Vec::new(),
        },
        Plugin {
            label: "mistnet, no daemon",
            bin: args.mistnet.clone(),
            conf: mistnet_conf(&format!("{dir}/absent.sock")),
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
        // Rotate which plugin goes first so none always runs on a just-woken machine.
        let n = plugins.len();
        for k in (0..n).map(|j| (i + j) % n) {
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
    let reference = &plugins[plugins.len() - 1];
    let ratio = |p: &Plugin, del: bool| {
        let (a, b) = if del {
            (&p.del, &reference.del)
        } else {
            (&p.add, &reference.add)
        };
        pct(a, 0.5) / pct(b, 0.5)
    };
    if args.json {
        let rows: Vec<_> = plugins
            .iter()
            .map(|p| {
                json!({"plugin": p.label, "stats": stats(p),
                            "ratio_p50": {"add": ratio(p, false), "del": ratio(p, true)}})
            })
            .collect();
        let doc = json!({"iterations": args.iterations, "plugins": rows});
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
        "{:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "plugin", "ADD p50", "p95", "p99", "DEL p50", "p95", "p99", "ADD ratio", "DEL ratio"
    )?;
    for p in &plugins {
        writeln!(
            out,
            "{:<20} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}x {:>8.2}x",
            p.label,
            pct(&p.add, 0.5),
            pct(&p.add, 0.95),
            pct(&p.add, 0.99),
            pct(&p.del, 0.5),
            pct(&p.del, 0.95),
            pct(&p.del, 0.99),
            ratio(p, false),
            ratio(p, true)
        )?;
    }
    Ok(())
}

/// The benchmark node's mistnetd, stopped (SIGTERM: it removes its device) on drop.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon this benchmark started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn tempfile_dir(tag: &str) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("mistnet-{tag}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.display().to_string())
}
