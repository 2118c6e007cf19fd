//! The mistnet CNI plugin library.
pub mod fsutil;
pub mod node_state;
