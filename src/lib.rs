//! volumed: block-device volumes served as regular files through FUSE, re-imaged on request.

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod daemon_args;
pub mod engine;
pub mod error;
pub mod events;
pub mod fuse;
pub mod gate;
pub mod identity;
pub mod loopdev;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod qcow2;
pub mod refill;
pub mod service;
pub mod sigbus;
pub mod store;
pub mod verify;
pub mod volume;
