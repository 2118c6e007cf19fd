//! `mistlab`: run an N-node mistnet edge cluster on this machine.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mistlab::{Lab, LabSpec};

#[derive(Parser)]
#[command(
    name = "mistlab",
    version,
    about = "An N-node mistnet edge cluster in network namespaces"
)]
struct Cli {
    /// Lab name (1-8 lowercase letters/digits); every namespace and the state dir carry it.
    #[arg(long, global = true, default_value = "lab")]
    name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring a lab up.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Give nodes IPv6 pod CIDRs too.
        #[arg(long)]
        dual_stack: bool,
    },
    /// Show nodes, pods and their addresses.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a node or a pod: `mistlab exec n1-p1 -- ping 10.244.2.2`.
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Tear a lab down (idempotent; also cleans up a lab whose processes died).
    Down,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MISTLAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mistlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Up {
            nodes,
            pods_per_node,
            dual_stack,
        } => {
            let mut spec = LabSpec::new(&cli.name, nodes, pods_per_node);
            spec.dual_stack = dual_stack;
            let lab = Lab::up(&spec)?;
            print_status(&mut out, &lab)?;
            lab.keep();
        }
        Cmd::Status { json } => {
            let lab = Lab::open(&cli.name)?;
            if json {
                writeln!(out, "{:#}", lab.status())?;
            } else {
                print_status(&mut out, &lab)?;
            }
        }
        Cmd::Exec { target, argv } => {
            let lab = Lab::open(&cli.name)?;
            let netns = lab.netns_of(&target)?;
            let status =
                mistlab::ns::command(&netns, &argv.iter().map(String::as_str).collect::<Vec<_>>())
                    .stdin(std::process::Stdio::inherit())
                    .status()
                    .context("running the command")?;
            return Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
        Cmd::Down => {
            let r = Lab::down_by_name(&cli.name)?;
            writeln!(
                out,
                "lab {}: removed {} namespaces, stopped {} processes{}",
                cli.name,
                r.namespaces.len(),
                r.processes.len(),
                if r.state_dir_removed {
                    ", state removed"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(out: &mut impl Write, lab: &Lab) -> Result<()> {
    writeln!(out, "lab {}", lab.name())?;
    writeln!(
        out,
        "{:<6} {:<12} {:<34} daemon",
        "node", "underlay", "pod CIDRs"
    )?;
    let status = lab.status();
    for n in status["nodes"].as_array().into_iter().flatten() {
        let daemon = match (n["daemonPid"].as_u64(), n["daemonAlive"].as_bool()) {
            (Some(pid), Some(true)) => format!("running (pid {pid})"),
            (Some(pid), _) => format!("DEAD (pid {pid})"),
            (None, _) => "-".to_owned(),
        };
        let cidrs: Vec<&str> = n["podCidrs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        writeln!(
            out,
            "{:<6} {:<12} {:<34} {}",
            n["name"].as_str().unwrap_or("?"),
            n["underlay"].as_str().unwrap_or("?"),
            cidrs.join(","),
            daemon
        )?;
    }
    writeln!(out, "{:<8} {:<6} addresses", "pod", "node")?;
    for p in lab.pods() {
        writeln!(out, "{:<8} {:<6} {}", p.name, p.node, p.ips.join(", "))?;
    }
    Ok(())
}
