//! `tessera check`
