//! `mistnet`: the CNI plugin binary. Reads CNI_* and stdin, runs the verb, prints the result or
//! the spec's error JSON on stdout. Logs go to stderr; set `MISTNET_CNI_LOG=debug` for detail.

use std::io::{Read, Write};
use std::process::ExitCode;

use mistnet_cni::config::{self, LATEST_VERSION, Version};
use mistnet_cni::error::{CniError, Code};
use mistnet_cni::plugin::{self, CniEnv};

fn main() -> ExitCode {
    init_logging();
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => Err(CniError::with_source(
            Code::IoFailure,
            "cannot read stdin",
            &e,
        )),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(doc)) => {
            if writeln!(out, "{doc}").is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::warn!(command = ?env.command, code = e.code.as_u32(), error = %e, "failed");
            let version = config::peek_version(&stdin)
                .filter(|v| Version::parse(v).is_some())
                .unwrap_or_else(|| LATEST_VERSION.to_owned());
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let level = match std::env::var(mistnet_cni::debugknobs::LOG_ENV).as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("info") => tracing::Level::INFO,
        Ok("error") => tracing::Level::ERROR,
        Ok(_) | Err(_) => tracing::Level::WARN,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .without_time()
        .try_init();
}
