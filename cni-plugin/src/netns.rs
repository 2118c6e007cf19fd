//! Network namespace handles and entering them briefly to open sockets.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

/// Namespace operations that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist")]
    Missing { path: String },
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: String },
    #[error("setns into {what} failed")]
    Setns {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
}

const NSFS_MAGIC: i64 = 0x6e73_6673;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

impl Netns {
    /// Opens the namespace at `path` (a bind mount under /var/run/netns or /proc/PID/ns/net).
    pub fn open(path: &str) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                NetnsError::Missing { path: path.into() }
            } else {
                NetnsError::Open {
                    path: path.into(),
                    source,
                }
            }
        })?;
        // SAFETY: fstatfs writes into a zeroed statfs struct we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        if rc != 0 {
            return Err(NetnsError::Open {
                path: path.into(),
                source: io::Error::last_os_error(),
            });
        }
        #[allow(clippy::unnecessary_cast)]
        let magic = st.f_type as i64;
        if magic != NSFS_MAGIC && magic != PROC_SUPER_MAGIC {
            return Err(NetnsError::NotNetns { path: path.into() });
        }
        Ok(Self {
            file,
            path: path.into(),
        })
    }

    /// The calling thread's current namespace.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path it was opened from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace's file descriptor (for `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> i32 {
        self.file.as_fd().as_raw_fd()
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to `home`.
    ///
    /// Only for short, synchronous work such as opening a socket: sockets keep the namespace
    /// they were created in.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.fd(), &self.path)?;
        let out = f();
        // Failing to return would leave the process in the pod's namespace: abort instead of
        // configuring the wrong namespace.
        if let Err(e) = setns(home.fd(), &home.path) {
            eprintln!("mistnet: fatal: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

fn setns(fd: i32, what: &str) -> Result<(), NetnsError> {
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            what: what.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `path` exists (used by DEL, which succeeds when the namespace is gone).
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}
