//! spiffe
