//! minipacs: a bedside mini PACS. It receives DICOM objects with C-STORE,
//! streams each one to disk with bounded memory, and acknowledges it only
//! once it is durable; it can also send (C-STORE) and verify (C-ECHO).
//!
//! The crate is a library with one binary, on top of the `dimse` protocol
//! crate: `services` implements its service traits, `store` is the durable
//! writer, `net` the listener and its bounds, `config` the configuration
//! model, `send` the SCU commands.

pub mod backoff;
pub mod ca;
pub mod commitment;
pub mod config;
pub mod dirfd;
pub mod drop;
pub mod durable;
pub mod forward;
pub mod handover;
pub mod index;
pub mod logs;
pub mod net;
pub mod part10;
pub mod privsep;
pub mod retention;
pub mod retrieve;
pub mod send;
pub mod service;
pub mod services;
pub mod shutdown;
pub mod store;
pub mod system;
pub mod timestamp;
pub mod tls;
pub mod update;
pub mod write_window;
