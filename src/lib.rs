//! roomfs: agent storage as an ordinary directory. A FUSE daemon mounts rooms (shared, durable
//! file stores) and sessions (an agent's scoped storage); writes are staged and committed
//! atomically on close.
//!
//! Layers, top to bottom: [`fuse`] (thin kernel adapter) → [`fs`] (the filesystem core, no FUSE
//! types) → [`store`] (the storage backend trait and its local-disk implementation).

pub mod cli;
pub mod control;
pub mod daemon;
pub mod errno;
pub mod error;
pub mod events;
pub mod fs;
pub mod fuse;
pub mod grant;
pub mod helper;
pub mod human;
pub mod metrics;
pub mod mount;
pub mod poll;
pub mod reader_gate;
pub mod records;
pub mod space;
pub mod store;
pub mod token;
pub mod urls;
