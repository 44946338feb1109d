//! The self-test's policy: workloads in children of the scratch cgroup, and the loopback (and
//! veth) endpoints the harness serves.

use std::net::Ipv4Addr;

/// Children of the scratch cgroup that the policy names (`nobody` is deliberately absent).
pub const CHILDREN: [&str; 6] = ["app", "team", "uid", "locked", "other", "nobody"];

/// The policy text for a scratch cgroup at `rel` (relative to the cgroup v2 root).
pub fn policy_yaml(rel: &str, port: u16, veth_host: Ipv4Addr, hostname: &str) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
metadata:
  name: tessera-selftest
spec:
  trustDomain: selftest.tessera.dev
  mode: enforce
  workloads:
    - name: app
      match:
        cgroup: {rel}/app
    - name: team
      match:
        cgroup: {rel}/team
    - name: root-app
      match:
        cgroup: {rel}/uid
        uid: 0
    - name: uid-any
      match:
        cgroup: {rel}/uid
    - name: locked
      egress: allowlist
      match:
        cgroup: {rel}/locked
    - name: other
      match:
        cgroup: {rel}/other
  endpoints:
    - name: vault
      kind: secret-store
      addresses: ["127.0.0.1/32", "::1/128", "{veth_host}/32"]
      ports: [{port}]
      protocol: tcp
    - name: vault-by-name
      kind: secret-store
      hosts: ["{hostname}"]
      ports: [{port}]
      protocol: tcp
    - name: dns
      kind: other
      addresses: ["127.0.0.1/32", "::1/128"]
      ports: [{port}]
      protocol: udp
  rules:
    - name: app-to-vault
      workloads: [app, root-app, locked]
      endpoints: [vault, vault-by-name, dns]
      credential: {{ required: true, maxTtl: 10m, bind: process }}
    - name: team-to-vault
      workloads: [team]
      endpoints: [vault]
      credential: {{ required: true, maxTtl: 10m, bind: workload }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    #[test]
    fn the_selftest_policy_is_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("selftest.yaml");
        let yaml = policy_yaml(
            "/tessera-selftest-1",
            18200,
            Ipv4Addr::new(198, 18, 0, 1),
            "vault.selftest.tessera.test",
        );
        std::fs::write(&path, yaml).expect("write");
        let set = PolicySet::load(&[path]).expect("the self-test policy must validate");
        assert_eq!(set.rules.len(), 2);
    }
}
