//! Root integration tests: netbench client/server on veth links between network namespaces,
//! the emulator's impairments measured end to end, and accuracy against iperf3 and irtt.
//!
//! They need root (CI runs as root) and FAIL with a clear message without it. Every test makes
//! its own namespaces (`nb-<pid>-<n>`), and guards remove them, the emulator's links and the
//! processes the test started, also when an assertion fails. Tests run one at a time (a global
//! lock) because their timing figures would otherwise compete for the same two cores.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netbench::emulate::{Config, Emulator, Node, Params};
use serde_json::Value;

// ---------------------------------------------------------------- client/server on veth

#[test]
fn veth_client_server_every_subcommand() {
    let _lock = setup();
    let (a, b) = (Netns::new(), Netns::new());
    let (_, ip_b) = veth(&a, &b, 1);
    let _srv = Server::start(&b);

    let tcp = a.netbench_json(&["tcp", &ip_b, "-t", "1s", "-P", "2"]);
    assert!(tcp["mbps"].as_f64().unwrap() > 100.0, "{tcp}");
    assert_eq!(tcp["per_stream_mbps"].as_array().unwrap().len(), 2);
    let rev = a.netbench_json(&["tcp", &ip_b, "-t", "1s", "-R"]);
    assert!(rev["mbps"].as_f64().unwrap() > 100.0, "{rev}");

    let udp = a.netbench_json(&["udp", &ip_b, "-t", "1s", "-r", "20mbit"]);
    assert_eq!(udp["lost"], 0, "{udp}");
    assert!(
        (udp["received_mbps"].as_f64().unwrap() - 20.0).abs() < 2.0,
        "{udp}"
    );

    let rtt = a.netbench_json(&["rtt", &ip_b, "-t", "1s", "-i", "10ms"]);
    assert!(rtt["received"].as_u64().unwrap() >= 95, "{rtt}");
    assert!(rtt["rtt"]["median_us"].as_f64().unwrap() < 2000.0, "{rtt}");

    let pmtu = a.netbench_json(&["pmtu", &ip_b]);
    assert_eq!(pmtu["pmtu"], 1500, "{pmtu}");

    let rrul = a.netbench_json(&["rrul", &ip_b, "-t", "2s", "-P", "1"]);
    assert!(rrul["loaded"]["received"].as_u64().unwrap() > 0, "{rrul}");

    // A plot is written.
    let svg = std::env::temp_dir().join(format!("nb-{}-plot.svg", std::process::id()));
    a.netbench(&["rtt", &ip_b, "-t", "1s", "--plot", svg.to_str().unwrap()]);
    let text = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(text.contains("<svg"));

    // Garbage does not hurt the server.
    let garbage = format!(
        "head -c 3000 /dev/urandom > /dev/udp/{ip_b}/9300; printf 'NB\\001\\003xx' > /dev/udp/{ip_b}/9300"
    );
    assert!(a.cmd("bash", &["-c", &garbage]).status().unwrap().success());
    let rtt = a.netbench_json(&["rtt", &ip_b, "-t", "300ms"]);
    assert!(rtt["received"].as_u64().unwrap() > 0);
}

#[test]
fn clear_errors_for_refused_unreachable_and_bad_flags() {
    let _lock = setup();
    let (a, b) = (Netns::new(), Netns::new());
    let (_, ip_b) = veth(&a, &b, 2);
    let refused = a.netbench_fail(&["tcp", &ip_b, "-t", "1s"]);
    assert!(
        refused.contains("refused") && refused.contains("netbench server"),
        "{refused}"
    );
    let refused = a.netbench_fail(&["rtt", &ip_b, "-t", "1s"]);
    assert!(
        refused.contains("refused") || refused.contains("no reply"),
        "{refused}"
    );
    let unreachable = a.netbench_fail(&["rtt", "10.203.9.9", "-t", "1s"]);
    assert!(
        unreachable.contains("unreachable") || unreachable.contains("cannot reach"),
        "{unreachable}"
    );
    let bad = a.netbench_fail(&["udp", &ip_b, "--rate", "10furlongs"]);
    assert!(bad.contains("furlongs"), "{bad}");
    let bad = a.netbench_fail(&["tcp", &ip_b, "-P", "0"]);
    assert!(bad.contains("-P") || bad.contains("streams"), "{bad}");
}

#[test]
fn server_exits_cleanly_on_sigint() {
    let _lock = setup();
    let (a, b) = (Netns::new(), Netns::new());
    let (_, ip_b) = veth(&a, &b, 3);
    let mut srv = Server::start(&b);
    a.netbench_json(&["rtt", &ip_b, "-t", "300ms"]);
    // SAFETY: a plain kill(2) to the process this test started.
    unsafe { libc::kill(srv.child.id() as i32, libc::SIGINT) };
    let status = wait_timeout(&mut srv.child, Duration::from_secs(3))
        .expect("server did not exit within 3 s of SIGINT");
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------- emulator fidelity

#[test]
fn emulated_50ms_delay_gives_100ms_rtt() {
    let _lock = setup();
    let net = Emulated::new(4, "a-b", "delay=50ms");
    let rtt = net
        .a
        .netbench_json(&["rtt", &net.ip_b, "-t", "2s", "-i", "10ms"]);
    let median_ms = rtt["rtt"]["median_us"].as_f64().unwrap() / 1e3;
    println!("configured 2 x 50 ms: median RTT {median_ms:.3} ms");
    assert!(
        (median_ms - 100.0).abs() <= 2.0,
        "median {median_ms} ms, want 100 ± 2"
    );
    assert_eq!(rtt["loss_pct"].as_f64().unwrap(), 0.0);
}

#[test]
fn emulated_10pct_bernoulli_loss_over_10k_packets() {
    let _lock = setup();
    let net = Emulated::new(5, "a>b", "loss=10%");
    // 10 000 packets of 125 bytes at 10 Mbit/s: one second.
    let udp = net
        .a
        .netbench_json(&["udp", &net.ip_b, "-t", "1s", "-r", "10mbit", "-l", "125"]);
    let sent = udp["sent"].as_u64().unwrap();
    let loss = udp["loss_pct"].as_f64().unwrap();
    println!("configured 10 %: measured {loss:.2} % over {sent} packets");
    assert!(sent >= 9_900, "{udp}");
    assert!((loss - 10.0).abs() <= 1.5, "loss {loss} %, want 10 ± 1.5");
    let stats = net.emu.stats().unwrap();
    assert!(
        stats
            .iter()
            .find(|s| s.link == "a>b")
            .unwrap()
            .counters
            .dropped_loss
            > 800
    );
}

#[test]
fn emulated_10mbit_rate_limits_tcp_goodput() {
    let _lock = setup();
    let net = Emulated::new(6, "a-b", "rate=10mbit");
    let tcp = net.a.netbench_json(&["tcp", &net.ip_b, "-t", "3s"]);
    let mbps = tcp["mbps"].as_f64().unwrap();
    println!("configured 10 Mbit/s: TCP goodput {mbps:.3} Mbit/s");
    assert!(
        (mbps - 10.0).abs() <= 0.5,
        "goodput {mbps} Mbit/s, want 10 ± 5 %"
    );
}

#[test]
fn partition_drops_everything_until_lifted() {
    let _lock = setup();
    let net = Emulated::new(7, "a-b", "ideal");
    let nb = env!("CARGO_BIN_EXE_netbench");
    let probe = net
        .a
        .cmd(nb, &["rtt", &net.ip_b, "-t", "3s", "-i", "10ms", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut probe = Guarded(probe);
    std::thread::sleep(Duration::from_millis(1000));
    // Cut through the control socket, as an operator would.
    let ctl = net.control.to_str().unwrap();
    assert!(
        Command::new(nb)
            .args(["emulate", "set", "-c", ctl, "link=a-*", "down"])
            .status()
            .unwrap()
            .success()
    );
    let before = forwarded(&net.emu);
    std::thread::sleep(Duration::from_millis(1000));
    let during = forwarded(&net.emu);
    assert_eq!(before, during, "nothing is forwarded while partitioned");
    net.emu.set("a-b", "up").unwrap();
    let out = probe.0.wait_with_output_ref();
    let rtt: Value = serde_json::from_slice(&out.stdout).unwrap();
    let loss = rtt["loss_pct"].as_f64().unwrap();
    println!("1 s partition in a 3 s run: loss {loss:.1} %");
    assert!((20.0..=45.0).contains(&loss), "{rtt}");
    assert!(
        rtt["lost_up"].as_u64().unwrap() > 50,
        "losses are on the way up: {rtt}"
    );
    let stats = net.emu.stats().unwrap();
    assert!(
        stats
            .iter()
            .find(|s| s.link == "a>b")
            .unwrap()
            .counters
            .dropped_down
            > 50
    );
    let stats_cli = Command::new(nb)
        .args(["emulate", "stats", "-c", ctl])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&stats_cli.stdout).contains("a>b"));
}

#[test]
fn emulated_mtu_duplication_reordering_and_bursts() {
    let _lock = setup();
    let net = Emulated::new(8, "a>b", "mtu=1280");
    let pmtu = net.a.netbench_json(&["pmtu", &net.ip_b]);
    assert_eq!(pmtu["pmtu"], 1280, "{pmtu}");
    net.emu
        .set("a>b", "mtu=0 dup=10% delay=5ms jitter=4ms reorder")
        .unwrap();
    let udp = net
        .a
        .netbench_json(&["udp", &net.ip_b, "-t", "1s", "-r", "4mbit", "-l", "500"]);
    let sent = udp["sent"].as_f64().unwrap();
    let dup = udp["duplicates"].as_f64().unwrap() / sent * 100.0;
    assert!((dup - 10.0).abs() < 3.0, "duplicates {dup} %: {udp}");
    assert!(udp["reordered"].as_u64().unwrap() > 10, "{udp}");
    assert_eq!(udp["lost"], 0, "{udp}");
    // Gilbert-Elliott: mean loss p/(p+r) * loss_bad = 1/(1+4) * 50% = 10%.
    net.emu.set("a>b", "ideal ge=5%,20%,0%,50%").unwrap();
    let udp = net
        .a
        .netbench_json(&["udp", &net.ip_b, "-t", "1s", "-r", "10mbit", "-l", "125"]);
    let loss = udp["loss_pct"].as_f64().unwrap();
    assert!((loss - 10.0).abs() < 3.0, "GE loss {loss} %: {udp}");
}

#[test]
fn three_namespaces_with_per_link_profiles() {
    let _lock = setup();
    let ns: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    let ctl = control_path(9);
    let cfg = Config {
        nodes: ns
            .iter()
            .enumerate()
            .map(|(i, n)| node(&format!("n{i}"), n, &format!("10.209.0.{}/24", i + 1)))
            .collect(),
        links: vec![
            (
                "n0-n1".into(),
                netbench::emulate::profile::apply(Params::default(), "delay=10ms").unwrap(),
            ),
            (
                "n0-n2".into(),
                netbench::emulate::preset("partitioned").unwrap(),
            ),
        ],
        control: Some(ctl),
        ..Config::default()
    };
    let emu = Emulator::start(cfg).unwrap();
    let _s1 = Server::start(&ns[1]);
    let _s2 = Server::start(&ns[2]);
    let r01 = ns[0].netbench_json(&["rtt", "10.209.0.2", "-t", "500ms", "-i", "20ms"]);
    // The minimum is what the emulator adds; the median also carries scheduling delays of a
    // loaded 2-core machine (the accuracy script measures medians on a quiet one).
    let m = r01["rtt"]["min_us"].as_f64().unwrap() / 1e3;
    assert!((19.8..22.0).contains(&m), "{r01}");
    let r12 = ns[1].netbench_json(&["rtt", "10.209.0.3", "-t", "500ms", "-i", "20ms"]);
    assert!(
        r12["rtt"]["median_us"].as_f64().unwrap() < 2000.0,
        "n1-n2 is ideal: {r12}"
    );
    let cut = ns[0].netbench_fail(&["rtt", "10.209.0.3", "-t", "500ms"]);
    assert!(cut.contains("no reply"), "{cut}");
    drop(emu);
}

// ---------------------------------------------------------------- accuracy vs references

#[test]
fn tcp_throughput_matches_iperf3() {
    let _lock = setup();
    let (a, b) = (Netns::new(), Netns::new());
    let (_, ip_b) = veth(&a, &b, 10);
    // A link of known capacity (tbf at 1 Gbit/s on the sender's side): on a bare veth both
    // tools race the CPU (~15 Gbit/s, ±10 % from run to run on this shared machine), which
    // measures the scheduler more than the tools. The bare-veth comparison is the accuracy
    // script's (docs/BENCHMARKS.md).
    run(
        "tc",
        &[
            "-n", &a.name, "qdisc", "add", "dev", "nbv", "root", "tbf", "rate", "1gbit", "burst",
            "512kb", "latency", "20ms",
        ],
    );
    let _srv = Server::start(&b);
    let _iperf = Guarded(
        b.cmd("iperf3", &["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 is installed"),
    );
    wait_listening(&b, 5201);
    // Interleaved runs, best of three each: the machine is shared.
    let (mut nb, mut ip3) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        let out = a
            .cmd("iperf3", &["-c", &ip_b, "-p", "5201", "-t", "2", "-J"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        ip3 = ip3.max(
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap()
                / 1e6,
        );
        nb = nb.max(
            a.netbench_json(&["tcp", &ip_b, "-t", "2s"])["mbps"]
                .as_f64()
                .unwrap(),
        );
    }
    let ratio = nb / ip3;
    println!("TCP: netbench {nb:.0} Mbit/s, iperf3 {ip3:.0} Mbit/s, ratio {ratio:.3}");
    assert!((ratio - 1.0).abs() <= 0.10, "ratio {ratio}");
    assert!(
        (800.0..1100.0).contains(&nb),
        "netbench {nb} Mbit/s on a 1 Gbit/s link"
    );
}

#[test]
fn median_rtt_matches_irtt() {
    let _lock = setup();
    let net = Emulated::new(11, "a-b", "delay=5ms");
    let ip_b = net.ip_b.clone();
    let _irtt = Guarded(
        net.b
            .cmd("irtt", &["server", "-b", &format!("{ip_b}:2112")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("irtt is installed"),
    );
    wait_listening_udp(&net.b, 2112);
    let out = net
        .a
        .cmd(
            "irtt",
            &[
                "client",
                "-i",
                "10ms",
                "-d",
                "2s",
                "-l",
                "64",
                "-Q",
                "-o",
                "-",
                &format!("{ip_b}:2112"),
            ],
        )
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let irtt = v["stats"]["rtt"]["median"].as_f64().unwrap() / 1e3;
    let nb = net
        .a
        .netbench_json(&["rtt", &ip_b, "-t", "2s", "-i", "10ms", "-l", "64"])["rtt"]["median_us"]
        .as_f64()
        .unwrap();
    let diff = (nb - irtt).abs();
    println!("RTT over a 2 x 5 ms emulated link: netbench median {nb:.1} µs, irtt {irtt:.1} µs");
    assert!(
        diff <= (0.05 * irtt).max(50.0),
        "netbench {nb} µs vs irtt {irtt} µs"
    );
}

// ---------------------------------------------------------------- helpers

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Fails clearly without root; serialises the tests.
fn setup() -> MutexGuard<'static, ()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "netbench's netns tests need root (they create network namespaces and veth pairs); run them as root, e.g. `sudo -E cargo test -p netbench --test netns`"
    );
    for tool in ["ip", "iperf3", "irtt"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is not installed (see scripts/setup.sh)"
        );
    }
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A network namespace removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!(
            "nb-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn cmd(&self, prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]).args(args);
        c
    }

    fn netbench(&self, args: &[&str]) -> Output {
        let out = self
            .cmd(env!("CARGO_BIN_EXE_netbench"), args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "netbench {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn netbench_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.netbench(&a);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Runs a command that must fail; returns its stderr.
    fn netbench_fail(&self, args: &[&str]) -> String {
        let out = self
            .cmd(env!("CARGO_BIN_EXE_netbench"), args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "netbench {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (SIGKILL, by its own pid) and reaped on drop.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> Output;
}

impl WaitRef for Child {
    fn wait_with_output_ref(&mut self) -> Output {
        use std::io::Read;
        let mut stdout = Vec::new();
        if let Some(mut o) = self.stdout.take() {
            o.read_to_end(&mut stdout).unwrap();
        }
        let status = self.wait().unwrap();
        Output {
            status,
            stdout,
            stderr: Vec::new(),
        }
    }
}

struct Server {
    child: Child,
}

impl Server {
    fn start(ns: &Netns) -> Self {
        let child = ns
            .cmd(env!("CARGO_BIN_EXE_netbench"), &["server"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let s = Self { child };
        wait_listening(ns, 9300);
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Joins `a` and `b` with a plain veth pair on 10.200.`net`.0/24; returns both addresses.
fn veth(a: &Netns, b: &Netns, net: u8) -> (String, String) {
    let (ia, ib) = (
        Ipv4Addr::new(10, 200, net, 1),
        Ipv4Addr::new(10, 200, net, 2),
    );
    run(
        "ip",
        &[
            "link", "add", "nbv", "netns", &a.name, "type", "veth", "peer", "name", "nbv", "netns",
            &b.name,
        ],
    );
    for (ns, ip) in [(a, ia), (b, ib)] {
        run(
            "ip",
            &[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "nbv",
            ],
        );
        run("ip", &["-n", &ns.name, "link", "set", "nbv", "up"]);
    }
    (ia.to_string(), ib.to_string())
}

/// Two namespaces joined by the emulator (library API), a server in `b`.
struct Emulated {
    // Field order is drop order: server, emulator, then the namespaces.
    _srv: Server,
    emu: Emulator,
    control: PathBuf,
    ip_b: String,
    a: Netns,
    b: Netns,
}

impl Emulated {
    fn new(net: u8, links: &str, spec: &str) -> Self {
        let (a, b) = (Netns::new(), Netns::new());
        let control = control_path(net);
        let cfg = Config {
            nodes: vec![
                node("a", &a, &format!("10.201.{net}.1/24")),
                node("b", &b, &format!("10.201.{net}.2/24")),
            ],
            links: vec![(
                links.to_owned(),
                netbench::emulate::profile::apply(Params::default(), spec).unwrap(),
            )],
            seed: 42,
            control: Some(control.clone()),
            ..Config::default()
        };
        let emu = Emulator::start(cfg).unwrap();
        let srv = Server::start(&b);
        Self {
            _srv: srv,
            emu,
            control,
            ip_b: format!("10.201.{net}.2"),
            a,
            b,
        }
    }
}

fn node(name: &str, ns: &Netns, addr: &str) -> Node {
    Node {
        name: name.into(),
        netns: ns.name.clone(),
        addrs: vec![addr.into()],
        ifname: "nb0".into(),
        mtu: 1500,
    }
}

fn control_path(n: u8) -> PathBuf {
    std::env::temp_dir().join(format!("nb-{}-{n}.sock", std::process::id()))
}

fn forwarded(emu: &Emulator) -> u64 {
    emu.stats()
        .unwrap()
        .iter()
        .map(|s| s.counters.forwarded)
        .sum()
}

fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_listening(ns: &Netns, port: u16) {
    wait_for(ns, &["-Hltn"], port);
}

fn wait_listening_udp(ns: &Netns, port: u16) {
    wait_for(ns, &["-Hlun"], port);
}

fn wait_for(ns: &Netns, flags: &[&str], port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = format!(":{port} ");
    while Instant::now() < deadline {
        let out = ns.cmd("ss", flags).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} in {} after 5 s", ns.name);
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
