//! `tessera logs`
