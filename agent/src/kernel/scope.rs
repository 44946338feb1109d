//! Where the kernel must wait for the agent's attestation: workloads chosen by selectors the
//! kernel cannot see (exe, exeSha256, gid, groups, systemd unit, container, Kubernetes) are
//! not written to `WORKLOADS`; instead their scope (their cgroup, or every cgroup, and their
//! uid, or every uid) is marked `WORKLOAD_NEEDS_ATTEST`, so that a caller there without a
//! current attested identity is `identity_pending` at a protected endpoint. So is the scope of
//! a workload whose cgroup does not exist yet, at its nearest existing ancestor: a cgroup made
//! after the policy was loaded is recognised from its first exec on.

use tessera_common::{
    ANY_CGROUP, ANY_UID, CONFIG_ATTEST_EXEC, NONE_ID, WORKLOAD_NEEDS_ATTEST, WorkloadKey,
    WorkloadValue,
};

use super::{CompiledPolicy, KernelError};

/// One scope to mark: a cgroup path (`None`: every cgroup) and a uid (`None`: every uid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Scope {
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
}

/// Marks every scope in `out.workloads`, merges each cgroup's any-uid entry into its per-uid
/// entries (the kernel reads one entry a level), and sets `CONFIG_ATTEST_EXEC` when anything
/// was marked.
pub(super) fn mark(
    out: &mut CompiledPolicy,
    scopes: &[Scope],
    resolve_cgroup: &impl Fn(&str) -> Result<u64, KernelError>,
) {
    for scope in scopes {
        let key = WorkloadKey {
            cgroup_id: scope
                .cgroup
                .as_deref()
                .map_or(ANY_CGROUP, |path| nearest_existing(path, resolve_cgroup)),
            uid: scope.uid.unwrap_or(ANY_UID),
            _pad: 0,
        };
        out.workloads
            .entry(key)
            .or_insert(WorkloadValue {
                workload_id: NONE_ID,
                flags: 0,
            })
            .flags |= WORKLOAD_NEEDS_ATTEST;
        out.config_flags |= CONFIG_ATTEST_EXEC;
    }
    let any_uid: Vec<(u64, WorkloadValue)> = out
        .workloads
        .iter()
        .filter(|(k, _)| k.uid == ANY_UID)
        .map(|(k, v)| (k.cgroup_id, *v))
        .collect();
    for (cgroup_id, any) in any_uid {
        for (key, value) in out.workloads.iter_mut() {
            if key.cgroup_id != cgroup_id || key.uid == ANY_UID {
                continue;
            }
            if value.workload_id == NONE_ID {
                value.workload_id = any.workload_id;
                value.flags |= any.flags;
            }
            value.flags |= any.flags & WORKLOAD_NEEDS_ATTEST;
        }
    }
}

/// The id of `path`, or of its nearest ancestor that exists (the root always does).
fn nearest_existing(path: &str, resolve: &impl Fn(&str) -> Result<u64, KernelError>) -> u64 {
    let mut path = path.trim_end_matches('/');
    loop {
        let candidate = if path.is_empty() { "/" } else { path };
        if let Ok(id) = resolve(candidate) {
            return id;
        }
        match path.rfind('/') {
            Some(i) if !path.is_empty() => path = &path[..i],
            _ => return ANY_CGROUP,
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_common::WORKLOAD_RESTRICTED;

    use super::*;

    fn resolve(path: &str) -> Result<u64, KernelError> {
        match path {
            "/" => Ok(1),
            "/app" => Ok(10),
            "/app/web" => Ok(11),
            _ => Err(KernelError::NoCgroup2),
        }
    }

    fn key(cgroup_id: u64, uid: u32) -> WorkloadKey {
        WorkloadKey {
            cgroup_id,
            uid,
            _pad: 0,
        }
    }

    fn value(workload_id: u32, flags: u32) -> WorkloadValue {
        WorkloadValue { workload_id, flags }
    }

    #[test]
    fn marks_scopes_at_the_nearest_existing_cgroup() {
        let mut out = CompiledPolicy::default();
        let scopes = [
            Scope {
                cgroup: Some("/app/web".into()),
                uid: None,
            },
            Scope {
                cgroup: Some("/app/missing/deeper".into()),
                uid: Some(7),
            },
            Scope {
                cgroup: None,
                uid: None,
            },
        ];
        mark(&mut out, &scopes, &resolve);
        assert_eq!(out.config_flags & CONFIG_ATTEST_EXEC, CONFIG_ATTEST_EXEC);
        assert_eq!(
            out.workloads.get(&key(11, ANY_UID)),
            Some(&value(NONE_ID, WORKLOAD_NEEDS_ATTEST))
        );
        assert_eq!(
            out.workloads.get(&key(10, 7)),
            Some(&value(NONE_ID, WORKLOAD_NEEDS_ATTEST))
        );
        assert_eq!(
            out.workloads.get(&key(ANY_CGROUP, ANY_UID)),
            Some(&value(NONE_ID, WORKLOAD_NEEDS_ATTEST))
        );
    }

    #[test]
    fn a_level_reads_as_one_entry() {
        let mut out = CompiledPolicy::default();
        // /app: workload 3 for any uid; workload 4 for uid 1000; a dynamic workload for uid 7.
        out.workloads
            .insert(key(10, ANY_UID), value(3, WORKLOAD_RESTRICTED));
        out.workloads.insert(key(10, 1000), value(4, 0));
        let scopes = [Scope {
            cgroup: Some("/app".into()),
            uid: Some(7),
        }];
        mark(&mut out, &scopes, &resolve);
        // uid 7 is pending, and falls back to workload 3 where the kernel must not wait.
        assert_eq!(
            out.workloads.get(&key(10, 7)),
            Some(&value(3, WORKLOAD_RESTRICTED | WORKLOAD_NEEDS_ATTEST))
        );
        assert_eq!(out.workloads.get(&key(10, 1000)), Some(&value(4, 0)));

        // Marking the any-uid entry reaches every uid entry of the level.
        let scopes = [Scope {
            cgroup: Some("/app".into()),
            uid: None,
        }];
        mark(&mut out, &scopes, &resolve);
        assert_eq!(
            out.workloads.get(&key(10, 1000)),
            Some(&value(4, WORKLOAD_NEEDS_ATTEST))
        );
        assert_eq!(
            out.workloads.get(&key(10, ANY_UID)),
            Some(&value(3, WORKLOAD_RESTRICTED | WORKLOAD_NEEDS_ATTEST))
        );
    }
}
