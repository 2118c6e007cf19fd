//! Debug knobs: every environment variable that changes the plugin's behaviour for debugging or
//! testing is read here, and nowhere else.

/// `MISTNET_CNI_LOG`: log level on stderr (`error`, `warn` (default), `info`, `debug`, `trace`).
pub const LOG_ENV: &str = "MISTNET_CNI_LOG";

/// `MISTNET_CNI_FAILPOINT`: abort the process at a named point of ADD, as a crash or a
/// SIGKILL from the runtime would. Used by the crash-recovery tests; never set in production.
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

    /// Aborts the process if this failpoint is armed.
    pub fn hit(self) {
        if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == self.name()) {
            std::process::abort();
        }
    }
}
