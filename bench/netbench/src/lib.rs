//! netbench: link testing and link emulation for edge links.
//!
//! The pure parts (wire protocol, statistics, the emulator's switch and link model) have no
//! I/O and no clock; the clients, the server and the emulator's shell do the I/O. The
//! emulator is usable as a library: see [`emulate::Emulator`].

pub mod client;
pub mod emulate;
pub mod output;
pub mod proto;
pub mod server;
pub mod stats;
