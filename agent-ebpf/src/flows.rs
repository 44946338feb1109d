//! The packet-drop fallback of connection ending, for kernels that cannot end a socket from
//! outside (no `SOCK_DESTROY`): cgroup_skb egress and ingress programs let the packets of a
//! socket connected under a credential (its `CONNECTIONS` record) pass only while its holder
//! holds a valid grant for that endpoint, as a connect now would find it. Every other packet
//! pays one hash lookup.

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SkBuffContext};
use tessera_common::{REASON_CREDENTIAL_VALID, RULE_CONNECTIONS_OUTLIVE, RuleKey};

use crate::decision::{GrantCheck, check_grants};
use crate::maps::{CONNECTIONS, RULES};

/// Return values of a cgroup_skb program.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Whether the packet's socket may still send and receive.
#[inline(always)]
pub fn filter(ctx: &SkBuffContext) -> i32 {
    // SAFETY: the helper reads the skb's socket (0 when it has none, never a recorded cookie).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = CONNECTIONS.get_ptr(&cookie) else {
        return PASS;
    };
    // SAFETY: a map value pointer from a successful lookup, read at once.
    let record = unsafe { *record };
    let key = RuleKey {
        workload_id: record.workload_id,
        endpoint_id: record.endpoint_id,
    };
    // A rule the policy no longer has ends its connections, like a grant that is gone.
    if let Some(rule) = RULES.get_ptr(&key)
        && unsafe { (*rule).flags } & RULE_CONNECTIONS_OUTLIVE != 0
    {
        return PASS;
    }
    let mut check = GrantCheck::new(record.workload_id, record.endpoint_id);
    check_grants(&mut check, record.tgid);
    if check.reason == REASON_CREDENTIAL_VALID {
        PASS
    } else {
        DROP
    }
}
