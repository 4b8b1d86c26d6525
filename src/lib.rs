//! volumed: block-device volumes served as regular files through FUSE, re-imaged on request.

pub mod config;
pub mod engine;
pub mod error;
pub mod identity;
pub mod model;
pub mod policy;
