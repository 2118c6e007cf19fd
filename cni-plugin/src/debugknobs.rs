//! Debug knobs: every environment variable that changes the plugin's behaviour for debugging or
//! testing is read here, and nowhere else.

/// `MISTNET_CNI_LOG`: log level on stderr (`error`, `warn` (default), `info`, `debug`, `trace`).
pub const LOG_ENV: &str = "MISTNET_CNI_LOG";

/// `MISTNET_CNI_FAILPOINT`: `<point>` aborts the process at a named point of ADD, as a crash or
/// a SIGKILL from the runtime would; `<point>:error` makes ADD fail there with an ordinary error
/// instead, to test rollback. Used by the tests; never set in production.
pub const FAILPOINT_ENV: &str = "MISTNET_CNI_FAILPOINT";

/// Points of ADD where a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// After the allocation is persisted, before the veth exists.
    AfterAlloc,
    /// After the veth pair exists, before it is configured.
    AfterVeth,
}

impl Failpoint {
    fn name(self) -> &'static str {
        match self {
            Failpoint::AfterAlloc => "after-alloc",
            Failpoint::AfterVeth => "after-veth",
        }
    }

    /// Aborts the process if this failpoint is armed to crash; returns an error if it is armed
    /// to fail.
    pub fn hit(self) -> std::io::Result<()> {
        let Ok(v) = std::env::var(FAILPOINT_ENV) else {
            return Ok(());
        };
        if v == self.name() {
            std::process::abort();
        }
        if v.strip_suffix(":error") == Some(self.name()) {
            return Err(std::io::Error::other(format!("failpoint {v}")));
        }
        Ok(())
    }
}
