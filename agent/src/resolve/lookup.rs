//! DNS lookups of endpoint hosts (A and AAAA, with TTLs) through hickory-resolver.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};

use super::ResolveError;
use crate::policy::HostName;

/// Asks one server (`--dns-server`) or the system's resolver configuration.
pub struct HostResolver {
    resolver: TokioResolver,
}

/// Why a lookup gave no answer (a name without records is an empty answer, not an error).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("`{0}` is not a DNS name the resolver accepts")]
    Name(String, #[source] hickory_resolver::proto::ProtoError),
    #[error("the {record_type} lookup failed")]
    Dns {
        record_type: &'static str,
        #[source]
        source: NetError,
    },
}

impl HostResolver {
    /// `server`: every lookup goes to it (UDP, then TCP for truncated answers); `None`: the
    /// system's configuration (/etc/resolv.conf, /etc/hosts).
    pub fn new(server: Option<SocketAddr>) -> Result<HostResolver, ResolveError> {
        let mut builder = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut ns.connections {
                    connection.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(ResolveError::SystemConfig)?,
        };
        // No cache: each refresh asks the server, so a changed answer is seen when the TTL
        // this agent keeps runs out, and every TTL is the server's.
        builder.options_mut().cache_size = 0;
        let resolver = builder.build().map_err(ResolveError::Build)?;
        Ok(HostResolver { resolver })
    }

    /// Every A and AAAA record of `host` (as an absolute name: no search domains), with its
    /// TTL. A name or type without records contributes nothing; any other failure of either
    /// lookup fails the whole lookup, so that a half answer never retires addresses.
    pub async fn lookup(&self, host: &HostName) -> Result<Vec<(IpAddr, Duration)>, LookupError> {
        let text = format!("{host}.");
        let name = Name::from_ascii(&text).map_err(|e| LookupError::Name(host.to_string(), e))?;
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name)
        );
        let mut answer = Vec::new();
        for (record_type, result) in [("A", v4), ("AAAA", v6)] {
            match result {
                Ok(lookup) => {
                    for record in lookup.answers() {
                        let ip = match &record.data {
                            RData::A(a) => IpAddr::V4(a.0),
                            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                            // CNAMEs on the way.
                            _ => continue,
                        };
                        answer.push((ip, Duration::from_secs(u64::from(record.ttl))));
                    }
                }
                Err(e) if e.is_no_records_found() => {}
                Err(source) => {
                    return Err(LookupError::Dns {
                        record_type,
                        source,
                    });
                }
            }
        }
        Ok(answer)
    }
}
