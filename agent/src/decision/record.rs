//! `DecisionRecord`: one line of the decision log, exactly as DESIGN 4.4 defines it.
use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tessera_common as common;

use crate::identity::spiffe::SpiffeId;

/// The `schema` value of every record this version writes.
pub const SCHEMA: &str = "tessera.decision/v1";

/// One decision: who connected where, the verdict, why, and under which rule and credential.
/// Never holds a token: a credential appears only as its `jti`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Always [`SCHEMA`] when written by this version.
    pub schema: String,
    /// Wall-clock time of the decision, RFC 3339 UTC with microseconds.
    #[serde(with = "rfc3339_micros")]
    pub ts: SystemTime,
    /// UUID v7.
    pub decision_id: String,
    pub verdict: Verdict,
    /// False for a deny that audit mode let through.
    pub enforced: bool,
    pub mode: DecisionMode,
    pub reason: Reason,
    pub hook: Hook,
    pub protocol: Protocol,
    pub destination: Destination,
    pub process: ProcessRecord,
    pub workload: Option<WorkloadRecord>,
    pub credential: Option<CredentialRecord>,
    pub policy: PolicyRecord,
    /// Hook `connection` only: the connection that was ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionRef>,
}

/// A connection ended because its credential was revoked or expired: the decision that let
/// it connect (its `decision_id`; absent when the agent did not see that decision) and when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// The connection's own address (the destination is the record's `destination`).
    pub source: std::net::SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    /// Name of the protected endpoint; null when no endpoint covers the destination
    /// (`egress_not_allowlisted`), for socket refusals (`raw_socket_refused`,
    /// `packet_socket_refused`: `ip` is then `0.0.0.0` for an IPv4 raw socket, else `::`, and
    /// `port` 0), or when the event's endpoint id is unknown to the loaded policy.
    pub endpoint: Option<String>,
    /// For a destination that two endpoints' resolved `hosts:` addresses claim at once (a
    /// name that moved onto another's address): those endpoints, oldest claim first. Such a
    /// destination is denied to everyone (`workload_not_allowed`) and `endpoint` is null,
    /// since no one endpoint decides it. Absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contested: Vec<String>,
    /// The destination as the caller gave it, when the kernel decided it as `ip`: an
    /// unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`, decided as the loopback it
    /// reaches) or an IPv4-compatible IPv6 address (decided as the IPv4 one). Absent when it
    /// is `ip` itself, or `ip`'s IPv4-mapped form on an IPv6 hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<OriginalDestination>,
}

/// `destination.original`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OriginalDestination {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// Null when the process was gone before the record was written.
    pub exe: Option<String>,
    /// Relative to the cgroup v2 root; null when it could not be established.
    pub cgroup: Option<String>,
    /// SHA-256 of the executable (lower-case hex), from the agent's attestation of the process;
    /// absent when not known (never computed while writing the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    /// The innermost systemd unit on the cgroup path (`getty@tty1.service`); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// The container ID on the cgroup path; absent when the process is in no container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The Kubernetes pod on the cgroup path; absent outside one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRecord>,
}

/// A Kubernetes pod: its UID from the cgroup path, the rest from the API server when known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub name: String,
    pub spiffe_id: SpiffeId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub jti: String,
    #[serde(with = "rfc3339_micros")]
    pub expires_at: SystemTime,
    /// "process" or "workload".
    pub bind: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// `sha256:<hex>` of the loaded policy files.
    pub revision: String,
    pub rule: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Whether the decision was taken under an enforcing or an auditing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionMode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Reason {
    CredentialValid,
    /// The rule needs no credential.
    Allowlisted,
    NoCredential,
    CredentialExpired,
    CredentialRevoked,
    WorkloadNotAllowed,
    UnknownWorkload,
    /// The workload has `egress: allowlist` and no endpoint covers the destination.
    EgressNotAllowlisted,
    /// A restricted workload asked for a raw IP socket (hook `sock_create`).
    RawSocketRefused,
    /// A restricted workload asked for a packet socket (hook `socket_syscall`; enforced by
    /// killing the process).
    PacketSocketRefused,
    /// The caller may belong to a workload only the agent can tell (exe, unit, container,
    /// pod…) and was not attested yet since its exec, setuid or cgroup move.
    IdentityPending,
    /// A code this version does not know (a newer kernel program or a newer log).
    #[serde(other)]
    #[value(skip)]
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    /// cgroup/sock_create (raw IP sockets).
    SockCreate,
    /// The syscalls/sys_enter_socket tracepoint (packet sockets).
    SocketSyscall,
    /// Not a kernel hook: the agent ended a connection whose credential was revoked or expired.
    Connection,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    /// A raw IP or packet socket (hooks `sock_create`, `socket_syscall`).
    Raw,
    #[serde(other)]
    Unknown,
}

impl DecisionRecord {
    /// One JSON line, without the trailing newline.
    pub fn to_json_line(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

impl Verdict {
    /// From a kernel `VERDICT_*` code; anything but allow counts as a deny.
    pub fn from_code(code: u8) -> Self {
        if code == common::VERDICT_ALLOW {
            Self::Allow
        } else {
            Self::Deny
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl DecisionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl From<crate::policy::Mode> for DecisionMode {
    fn from(mode: crate::policy::Mode) -> Self {
        match mode {
            crate::policy::Mode::Enforce => Self::Enforce,
            crate::policy::Mode::Audit => Self::Audit,
        }
    }
}

impl Reason {
    /// Every reason a record can carry, in the order of DESIGN 4.4.
    pub const ALL: [Reason; 11] = [
        Self::CredentialValid,
        Self::Allowlisted,
        Self::NoCredential,
        Self::CredentialExpired,
        Self::CredentialRevoked,
        Self::WorkloadNotAllowed,
        Self::UnknownWorkload,
        Self::EgressNotAllowlisted,
        Self::RawSocketRefused,
        Self::PacketSocketRefused,
        Self::IdentityPending,
    ];

    /// From a kernel `REASON_*` code.
    pub fn from_code(code: u8) -> Self {
        match code {
            common::REASON_CREDENTIAL_VALID => Self::CredentialValid,
            common::REASON_ALLOWLISTED => Self::Allowlisted,
            common::REASON_NO_CREDENTIAL => Self::NoCredential,
            common::REASON_CREDENTIAL_EXPIRED => Self::CredentialExpired,
            common::REASON_CREDENTIAL_REVOKED => Self::CredentialRevoked,
            common::REASON_WORKLOAD_NOT_ALLOWED => Self::WorkloadNotAllowed,
            common::REASON_UNKNOWN_WORKLOAD => Self::UnknownWorkload,
            common::REASON_EGRESS_NOT_ALLOWLISTED => Self::EgressNotAllowlisted,
            common::REASON_RAW_SOCKET_REFUSED => Self::RawSocketRefused,
            common::REASON_PACKET_SOCKET_REFUSED => Self::PacketSocketRefused,
            common::REASON_IDENTITY_PENDING => Self::IdentityPending,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CredentialValid => "credential_valid",
            Self::Allowlisted => "allowlisted",
            Self::NoCredential => "no_credential",
            Self::CredentialExpired => "credential_expired",
            Self::CredentialRevoked => "credential_revoked",
            Self::WorkloadNotAllowed => "workload_not_allowed",
            Self::UnknownWorkload => "unknown_workload",
            Self::EgressNotAllowlisted => "egress_not_allowlisted",
            Self::RawSocketRefused => "raw_socket_refused",
            Self::PacketSocketRefused => "packet_socket_refused",
            Self::IdentityPending => "identity_pending",
            Self::Unknown => "unknown",
        }
    }
}

impl Hook {
    /// From a kernel `HOOK_*` code.
    pub fn from_code(code: u8) -> Self {
        match code {
            common::HOOK_CONNECT4 => Self::Connect4,
            common::HOOK_CONNECT6 => Self::Connect6,
            common::HOOK_SENDMSG4 => Self::Sendmsg4,
            common::HOOK_SENDMSG6 => Self::Sendmsg6,
            common::HOOK_SOCK_CREATE => Self::SockCreate,
            common::HOOK_SOCKET_SYSCALL => Self::SocketSyscall,
            common::HOOK_CONNECTION => Self::Connection,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::SockCreate => "sock_create",
            Self::SocketSyscall => "socket_syscall",
            Self::Connection => "connection",
            Self::Unknown => "unknown",
        }
    }
}

impl Protocol {
    /// From a kernel `PROTO_*` code (an IP protocol number).
    pub fn from_code(code: u8) -> Self {
        match code {
            common::PROTO_TCP => Self::Tcp,
            common::PROTO_UDP => Self::Udp,
            common::PROTO_RAW => Self::Raw,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Raw => "raw",
            Self::Unknown => "unknown",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    )*};
}
display_as_str!(Verdict, DecisionMode, Reason, Hook, Protocol);

/// RFC 3339 in UTC with microseconds (`2026-11-23T10:00:00.123456Z`).
mod rfc3339_micros {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(|e| {
            D::Error::custom(format!("{text:?} is not an RFC 3339 UTC timestamp: {e}"))
        })
    }
}

#[cfg(test)]
mod tests;
