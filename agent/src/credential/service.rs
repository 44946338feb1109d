//! `CredentialService`: decides, signs, writes the grant, remembers; and revokes.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};
use tessera_common::{GRANT_ACTIVE, GRANT_KEEP_ON_EXEC, GRANT_TREE, GrantSlot, WorkloadGrantKey};
use tracing::{info, warn};

use super::GrantStore;
use super::api::{TokenRequest, TokenResponse};
use super::bundle_dir::BundleDir;
use super::bundle_k8s::K8sBundle;
use super::decide;
use super::errors::{CredentialError, GrantStoreError, TokenError};
use super::external;
use super::jwt::{Claims, OnBehalfOf};
use super::keyring::{KeyRing, Rotation};
use super::keys::SigningAlgorithm;
use super::limit::{LimitKey, Limiter, RateLimit};
use super::registry::{CredentialInfo, Registry, RevokeTarget};
use crate::identity::attestor::{Attested, Attestor};
use crate::identity::evidence::EvidenceReader;
use crate::identity::k8s::PodCache;
use crate::identity::spiffe::SpiffeId;
use crate::kernel::KernelIds;
use crate::policy::{Bind, EndpointId, PolicySet, WorkloadId};

/// Issues credentials to attested callers and keeps the kernel grants in step.
pub struct CredentialService {
    keys: RwLock<KeyRing>,
    issuer: String,
    grants: Arc<dyn GrantStore>,
    registry: Registry,
    attestor: Arc<Attestor>,
    observer: RwLock<Option<Arc<dyn CredentialObserver>>>,
    limiter: Limiter,
    /// The public keys served (JWKS, `FetchJWTBundles`): a new value on every change.
    bundle: tokio::sync::watch::Sender<serde_json::Value>,
    /// Where this agent publishes its keys and finds the trust domain's others.
    bundle_dir: Option<BundleDir>,
    /// Where this agent publishes its keys and finds the others' in Kubernetes.
    bundle_k8s: Option<K8sBundle>,
    /// Notified after every revocation: the connections counting on it are then ended.
    revocations: Arc<tokio::sync::Notify>,
}

/// Told of every credential request's outcome and how long it took (metrics).
pub trait CredentialObserver: Send + Sync {
    fn issued(&self, elapsed: Duration);
    /// `reason`: the 403 reason, or `bad_request`, `not_found`, `internal`.
    fn refused(&self, reason: &str, elapsed: Duration);
    /// An issuance module was asked: `allow`, `deny`, or why it gave no answer (`error`,
    /// `timeout`, `undefined`, `invalid_result`: each a deny).
    fn module_decided(&self, _result: &'static str) {}
    /// A token a request carried was checked: `kind` `subject` or `evidence`, `result`
    /// `verified` or why not (`expired`, `bad_signature`, …).
    fn token_checked(&self, _kind: &'static str, _result: &'static str) {}
}

/// Why a request gets no credential: an HTTP status, a stable reason, a message saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 400
    BadRequest(String),
    /// 403 `{"error", "reason"}`
    Forbidden { reason: &'static str, error: String },
    /// 403 `{"error", "reason": "policy_denied", "reasons"}`: the rule's issuance module said
    /// no, or gave no answer (which is a no).
    PolicyDenied { error: String, reasons: Vec<String> },
    /// 404
    NotFound(String),
    /// 500; the message is for the caller, details are logged.
    Internal(String),
    /// 429 `{"error", "reason": "rate_limited"}` with `Retry-After`: the workload asks faster
    /// than its rate limit.
    TooManyRequests {
        retry_after: Duration,
        error: String,
    },
}

impl Refusal {
    fn forbidden(reason: &'static str, error: impl Into<String>) -> Refusal {
        Refusal::Forbidden {
            reason,
            error: error.into(),
        }
    }
}

impl CredentialService {
    /// Loads (or creates) the signing key of `algorithm` in `state_dir`.
    pub fn new(
        state_dir: &Path,
        issuer: String,
        algorithm: SigningAlgorithm,
        policy: Arc<PolicySet>,
        grants: Arc<dyn GrantStore>,
    ) -> Result<Self, CredentialError> {
        let keys = KeyRing::load(state_dir, algorithm)?;
        let (bundle, _) = tokio::sync::watch::channel(keys.jwks());
        Ok(CredentialService {
            bundle,
            keys: RwLock::new(keys),
            bundle_dir: None,
            bundle_k8s: None,
            issuer,
            attestor: Arc::new(Attestor::new(
                EvidenceReader::default(),
                PodCache::disabled(),
                policy,
            )),
            grants,
            registry: Registry::open(state_dir),
            observer: RwLock::new(None),
            limiter: Limiter::new(Some(RateLimit::DEFAULT)),
            revocations: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Publishes this agent's keys in `dir` and serves the union of every agent's there
    /// (`--trust-bundle-dir`).
    pub fn with_trust_bundle_dir(
        mut self,
        dir: Option<&Path>,
        state_dir: &Path,
    ) -> Result<Self, CredentialError> {
        if let Some(dir) = dir {
            self.bundle_dir = Some(BundleDir::open(dir, state_dir)?);
            self.refresh_bundle(true);
        }
        Ok(self)
    }

    /// Publishes this agent's keys in its object of the Kubernetes trust bundle and serves
    /// the union of the trust domain's objects (`--trust-bundle-k8s`).
    pub fn with_trust_bundle_k8s(mut self, bundle: Option<K8sBundle>) -> Self {
        if bundle.is_some() {
            self.bundle_k8s = bundle;
            self.refresh_bundle(true);
        }
        self
    }

    /// Writes this agent's keys to the bundle sources (when `own_changed`), reads the
    /// others', and tells bundle watchers when the union changed.
    pub fn refresh_bundle(&self, own_changed: bool) {
        let mut ring = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = own_changed;
        let mut others = Vec::new();
        if let Some(dir) = &self.bundle_dir {
            if own_changed && let Err(e) = dir.publish(&ring.own_jwks()) {
                warn!(error = %e, "cannot write this agent's keys to the trust bundle directory");
            }
            others.extend(dir.others());
        }
        if let Some(k8s) = &self.bundle_k8s {
            if own_changed {
                k8s.publish(&ring.own_jwks());
            }
            others.extend(k8s.others());
        }
        if self.bundle_dir.is_some() || self.bundle_k8s.is_some() {
            changed |= ring.set_foreign(others, self.longest_ttl());
        }
        if changed {
            self.bundle.send_replace(ring.jwks());
        }
    }

    /// Limits each workload's credential requests to `limit` (`None`: no limit).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.limiter = Limiter::new(limit);
        self
    }

    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.limiter.limit()
    }

    /// Who is told of each request's outcome (one observer; a second call replaces it).
    pub fn set_observer(&self, observer: Arc<dyn CredentialObserver>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    /// Notified after every revocation (`tessera revoke`, `DELETE /v1/credentials/{jti}`).
    pub fn revocations(&self) -> Arc<tokio::sync::Notify> {
        self.revocations.clone()
    }

    /// Attests callers with `attestor` (which writes their identities to the kernel) instead
    /// of one of its own that only answers.
    pub fn with_attestor(mut self, attestor: Arc<Attestor>) -> Self {
        self.attestor = attestor;
        self
    }

    pub fn attestor(&self) -> &Arc<Attestor> {
        &self.attestor
    }

    /// Replaces the policy used for new requests (after a reload), the attestor's too.
    pub fn set_policy(&self, policy: Arc<PolicySet>) {
        self.attestor.set_policy(policy);
    }

    /// The credential behind a kernel `credential_id` (for the decision log).
    pub fn lookup(&self, credential_id: u64) -> Option<CredentialInfo> {
        self.registry.by_credential_id(credential_id)
    }

    /// Credentials neither revoked nor expired.
    pub fn active_count(&self) -> usize {
        self.registry.active_count(SystemTime::now())
    }

    /// The public keys that verify issued tokens.
    pub fn jwks(&self) -> serde_json::Value {
        self.bundle.borrow().clone()
    }

    /// The signing key's id (the `kid` of tokens, RFC 7638 thumbprint).
    pub fn key_id(&self) -> String {
        self.ring().current().kid().to_owned()
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A new signing key now (`tessera rotate-key`, the schedule); the old public key stays
    /// published until every token it signed has expired. Bundle watchers are told.
    pub fn rotate_key(&self) -> Result<Rotation, CredentialError> {
        let longest = self.longest_ttl();
        let rotation = {
            let mut ring = self.keys.write().unwrap_or_else(|e| e.into_inner());
            ring.rotate(longest)?
        };
        self.refresh_bundle(true);
        info!(kid = %rotation.kid, retired = %rotation.retired, retired_until = rotation.retired_until, "signing key rotated");
        Ok(rotation)
    }

    /// The policy's longest `maxTtl`: how long a token signed now may stay valid.
    fn longest_ttl(&self) -> Duration {
        self.attestor
            .policy()
            .rules
            .iter()
            .filter_map(|r| r.credential.map(|c| c.max_ttl))
            .max()
            .unwrap_or_default()
    }

    /// Stops publishing retired keys whose tokens have all expired.
    pub fn prune_keys(&self) {
        let pruned = self.keys.write().unwrap_or_else(|e| e.into_inner()).prune();
        self.refresh_bundle(pruned);
    }

    /// How long ago the current key was made (its file's age; zero when unknown).
    pub fn key_age(&self) -> Duration {
        self.ring().current().created.elapsed().unwrap_or_default()
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies a JWT-SVID of the trust domain for `audience` (signature by a published key,
    /// `aud`, `exp`, `nbf`, `sub` a SPIFFE ID); answers its claims.
    pub fn validate_svid(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), TokenError> {
        self.ring().verify_svid(token, audience)
    }

    /// The JWKS now, and each one after it (`FetchJWTBundles` streams them).
    pub fn bundle(&self) -> tokio::sync::watch::Receiver<serde_json::Value> {
        self.bundle.subscribe()
    }

    /// The trust domains whose bundle this agent serves: the policy's.
    pub fn trust_domains(&self) -> Vec<String> {
        let policy = self.attestor.policy();
        let mut domains: Vec<String> = policy
            .workloads
            .iter()
            .map(|w| w.spiffe_id.trust_domain().to_owned())
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }

    /// Verifies a token this agent issued, for `audience`.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, TokenError> {
        self.ring().verify(token, &self.issuer, audience)
    }

    /// Marks the kernel grants of the targeted credentials revoked; returns their jtis.
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<String>, CredentialError> {
        let mut revoked = Vec::new();
        for c in self.registry.select(target, SystemTime::now()) {
            self.revoke_grant(&c).map_err(CredentialError::Grants)?;
            self.registry.mark_revoked(&c.jti);
            info!(jti = %c.jti, workload = %c.spiffe_id, endpoint = %c.audience, pid = c.pid, "credential revoked");
            revoked.push(c.jti);
        }
        if !revoked.is_empty() {
            self.revocations.notify_one();
        }
        Ok(revoked)
    }

    fn revoke_grant(&self, c: &CredentialInfo) -> Result<bool, GrantStoreError> {
        match c.bind {
            Bind::Process => self.grants.revoke_process_grant(c.pid, c.credential_id),
            Bind::ProcessTree => self
                .grants
                .revoke_tree_grant(c.credential_id)
                .map(|n| n > 0),
            Bind::Workload => self
                .grants
                .revoke_workload_grant(workload_key(c), c.credential_id),
        }
    }

    /// Takes one request from the caller's workload's bucket (its uid's when it is none).
    fn within_rate_limit(&self, caller: &Attested) -> Result<(), Refusal> {
        let key = match caller.workload {
            Some(wid) => LimitKey::Workload(caller.policy.workload(wid).spiffe_id.clone()),
            None => LimitKey::Uid(caller.evidence.uid.real),
        };
        self.limiter
            .take(&key, std::time::Instant::now())
            .map_err(|retry_after| {
                let limit = self
                    .limiter
                    .limit()
                    .map(|l| l.to_string())
                    .unwrap_or_default();
                let who = match &key {
                    LimitKey::Workload(id) => format!("workload {id}"),
                    LimitKey::Uid(uid) => format!("uid {uid}"),
                };
                Refusal::TooManyRequests {
                    retry_after,
                    error: format!(
                        "{who} asks for credentials faster than the agent's limit of {limit}; \
                         retry after {} ms",
                        retry_after.as_millis().max(1)
                    ),
                }
            })
    }

    /// `POST /v1/credentials`: decide, sign, write the grant, then make sure the caller is
    /// still there (`still_alive`) before answering.
    pub(crate) fn issue(
        &self,
        caller: &Attested,
        req: &TokenRequest,
        still_alive: &dyn Fn() -> bool,
    ) -> Result<TokenResponse, Refusal> {
        let started = std::time::Instant::now();
        let result = self.issue_unobserved(caller, req, still_alive);
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(observer) = observer {
            let elapsed = started.elapsed();
            match &result {
                Ok(_) => observer.issued(elapsed),
                Err(Refusal::Forbidden { reason, .. }) => observer.refused(reason, elapsed),
                Err(Refusal::PolicyDenied { .. }) => observer.refused("policy_denied", elapsed),
                Err(Refusal::BadRequest(_)) => observer.refused("bad_request", elapsed),
                Err(Refusal::NotFound(_)) => observer.refused("not_found", elapsed),
                Err(Refusal::Internal(_)) => observer.refused("internal", elapsed),
                Err(Refusal::TooManyRequests { .. }) => observer.refused("rate_limited", elapsed),
            }
        }
        result
    }

    fn issue_unobserved(
        &self,
        caller: &Attested,
        req: &TokenRequest,
        still_alive: &dyn Fn() -> bool,
    ) -> Result<TokenResponse, Refusal> {
        // The policy the caller was attested under: its ids go with it.
        let policy = caller.policy.clone();
        let ev = &caller.evidence;
        self.within_rate_limit(caller)?;
        let task = req.validate()?;
        let Some(wid) = caller.workload else {
            return Err(Refusal::forbidden(
                "unknown_workload",
                format!(
                    "process {} ({}, uid {}, cgroup {}) matches no workload of the policy; \
                     `tessera whoami --pid {}` shows each selector",
                    ev.pid, ev.comm, ev.uid.real, ev.cgroup, ev.pid
                ),
            ));
        };
        let workload = policy.workload(wid);
        let Some((eid, endpoint)) = policy.endpoint_by_audience(&req.audience) else {
            return Err(Refusal::forbidden(
                "unknown_audience",
                format!(
                    "no endpoint named {:?}: the audience is an endpoint name of the policy, \
                     or one of an endpoint's `audiences:`",
                    req.audience
                ),
            ));
        };
        let Some((_, rule)) = policy.rule_for(wid, eid) else {
            return Err(Refusal::forbidden(
                "workload_not_allowed",
                format!(
                    "no rule lets workload {} reach endpoint {}",
                    workload.spiffe_id, endpoint.name
                ),
            ));
        };
        let Some(cred_policy) = rule.credential else {
            return Err(Refusal::forbidden(
                "credential_not_required",
                format!(
                    "rule {} allows {} to reach {} without a credential: nothing to issue",
                    rule.name, workload.spiffe_id, endpoint.name
                ),
            ));
        };
        let max_ttl = cred_policy.max_ttl.as_secs().max(1);
        let ttl = req.ttl_seconds.unwrap_or(max_ttl);
        if ttl > max_ttl {
            return Err(Refusal::forbidden(
                "ttl_exceeds_max",
                format!(
                    "ttl_seconds {ttl} is over the rule {}'s maxTtl of {max_ttl} s; ask for {max_ttl} or less",
                    rule.name
                ),
            ));
        }

        let tokens = external::verify_request(
            &policy.trusted_issuers,
            &self.issuer,
            req,
            &|kind, result| self.observe(|o| o.token_checked(kind, result)),
        )?;
        if let Some(m) = &rule.token_match
            && !tokens
                .evidence
                .iter()
                .any(|t| m.matches(&t.issuer, &t.sub, &t.claims))
        {
            return Err(Refusal::forbidden(
                "evidence_not_matched",
                format!(
                    "rule {} asks for an evidence token from trusted issuer {}{}{}; the request \
                     carried {} verified evidence token(s), none of them matching",
                    rule.name,
                    m.issuer,
                    m.subject
                        .as_ref()
                        .map(|s| format!(" with sub {s:?}"))
                        .unwrap_or_default(),
                    if m.claims.is_empty() {
                        String::new()
                    } else {
                        format!(" with claims {:?}", m.claims)
                    },
                    tokens.evidence.len()
                ),
            ));
        }

        let scopes = decide::requested_scopes(rule, req.scopes.as_deref()).map_err(|unknown| {
            Refusal::forbidden(
                "scope_not_allowed",
                format!(
                    "rule {} does not offer the scope(s) {}; it offers: {}",
                    rule.name,
                    unknown.join(" "),
                    if rule.scopes.is_empty() {
                        "none".to_owned()
                    } else {
                        rule.scopes.join(" ")
                    }
                ),
            )
        })?;
        let now = SystemTime::now();
        // Acting for a person: no longer than their token.
        let ttl = match &tokens.subject {
            None => ttl,
            Some(person) => {
                let left = person.exp.saturating_sub(unix_seconds(now));
                if left == 0 {
                    return Err(Refusal::forbidden(
                        "untrusted_token",
                        "subject_token is refused: it has expired",
                    ));
                }
                ttl.min(left)
            }
        };
        let (ttl, scopes) = match rule.issuance {
            None => (ttl, scopes),
            Some(id) => {
                let asked = decide::Asked {
                    workload,
                    evidence: ev,
                    endpoint,
                    rule,
                    credential: cred_policy,
                    request: req,
                    task: task.as_deref(),
                    ttl_seconds: ttl,
                    scopes: &scopes,
                    now,
                    history: decide::History::of(&self.registry.kept_of(&workload.spiffe_id), now),
                    on_behalf_of: tokens.subject.as_ref(),
                    evidence_tokens: &tokens.evidence,
                };
                let (result, decided) = decide::decide(policy.issuance_module(id), &asked);
                self.module_decided(result);
                let grant = decided?;
                (grant.ttl_seconds, grant.scopes)
            }
        };
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let iat = since_epoch.as_secs();
        let exp = iat + ttl;
        let credential_id = self.registry.fresh_id();
        let jti = uuid::Uuid::now_v7().to_string();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: workload.spiffe_id.clone(),
            // The audience asked for: the endpoint's name or one of its `audiences:`.
            aud: req.audience.clone(),
            iat,
            nbf: iat,
            exp,
            jti: jti.clone(),
            task: task.unwrap_or_else(|| jti.clone()),
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            obo: tokens.subject.as_ref().map(|p| OnBehalfOf {
                iss: p.iss.clone(),
                sub: p.sub.clone(),
            }),
        };
        let signed = {
            let mut ring = self.keys.write().unwrap_or_else(|e| e.into_inner());
            let signed = ring.current().sign(&claims);
            if signed.is_ok() {
                ring.signed(exp);
            }
            signed
        };
        let token = signed.map_err(|e| {
            warn!(error = %e, "cannot sign a token");
            Refusal::Internal("the agent could not sign the token".to_owned())
        })?;

        // The kernel grant ends when the token does: `exp` is whole seconds, so take off the
        // fraction of the current second.
        let ttl_ns = Duration::from_secs(ttl)
            .saturating_sub(Duration::from_nanos(u64::from(since_epoch.subsec_nanos())));
        // Kernel ids are stable by name (`KernelIds`), not policy positions.
        let ids = KernelIds::of(&policy);
        let (kernel_workload, kernel_endpoint) = (ids.workload(wid), ids.endpoint(eid));
        let slot = GrantSlot {
            expires_at_ns: boot_time_ns().saturating_add(duration_ns(ttl_ns)),
            credential_id,
            endpoint_id: kernel_endpoint,
            workload_id: kernel_workload,
            state: GRANT_ACTIVE,
            flags: match cred_policy.bind {
                Bind::ProcessTree => GRANT_TREE,
                Bind::Process if cred_policy.keep_on_exec => GRANT_KEEP_ON_EXEC,
                Bind::Process | Bind::Workload => 0,
            },
        };
        let info = CredentialInfo {
            credential_id,
            jti: jti.clone(),
            spiffe_id: workload.spiffe_id.clone(),
            // The kernel ids (what the grant is keyed by), which outlive reorderings.
            workload: WorkloadId(kernel_workload),
            audience: endpoint.name.clone(),
            endpoint: EndpointId(kernel_endpoint),
            task: claims.task.clone(),
            pid: ev.pid,
            issued_at: UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
            bind: cred_policy.bind,
            revoked: false,
        };
        let written = match cred_policy.bind {
            Bind::Process | Bind::ProcessTree => {
                self.grants.put_process_grant(ev.pid, caller.instance, slot)
            }
            Bind::Workload => self.grants.put_workload_grant(workload_key(&info), slot),
        };
        if let Err(e) = written {
            return Err(match e {
                GrantStoreError::NoFreeSlot { .. } => {
                    Refusal::forbidden("too_many_credentials", e.to_string())
                }
                GrantStoreError::Kernel(_) => {
                    warn!(error = %e, source = ?std::error::Error::source(&e), "cannot write a grant");
                    Refusal::Internal("the agent could not write the kernel grant".to_owned())
                }
            });
        }
        self.registry.insert(info.clone());

        // The grant went in for this tgid; if the process exited meanwhile, the kernel's exit
        // hook may already have run, and the tgid could be reused: take the grant back out.
        if !still_alive() {
            let removed = match info.bind {
                Bind::Process => self.grants.remove_process_grant(info.pid, credential_id),
                // A child forked meanwhile holds a copy: revoke them all.
                Bind::ProcessTree => self.grants.revoke_tree_grant(credential_id).map(|n| n > 0),
                Bind::Workload => self
                    .grants
                    .revoke_workload_grant(workload_key(&info), credential_id),
            };
            if let Err(e) = removed {
                warn!(error = %e, jti = %jti, "cannot withdraw the grant of an exited caller");
            }
            self.registry.remove(&jti);
            return Err(Refusal::forbidden(
                "caller_exited",
                "the calling process exited before the credential was issued",
            ));
        }

        info!(
            workload = %info.spiffe_id,
            endpoint = %info.audience,
            jti = %jti,
            pid = ev.pid,
            ttl_seconds = ttl,
            bind = info.bind.as_str(),
            "credential issued"
        );
        Ok(TokenResponse {
            token,
            jti,
            spiffe_id: info.spiffe_id,
            audience: info.audience,
            expires_at: humantime::format_rfc3339_seconds(info.expires_at).to_string(),
            bind: info.bind.as_str().to_owned(),
            scopes,
        })
    }

    fn module_decided(&self, result: &'static str) {
        self.observe(|o| o.module_decided(result));
    }

    fn observe(&self, tell: impl FnOnce(&dyn CredentialObserver)) {
        let observer = self
            .observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(observer) = observer {
            tell(observer.as_ref());
        }
    }

    /// `DELETE /v1/credentials/{jti}`: the holder's workload ends a credential early.
    pub(crate) fn end_own(&self, caller: &Attested, jti: &str) -> Result<String, Refusal> {
        let not_found = || {
            Refusal::NotFound(format!(
                "no credential {jti:?} issued to your workload; check the jti"
            ))
        };
        let policy = caller.policy.clone();
        let wid = caller.workload.ok_or_else(not_found)?;
        let c = self
            .registry
            .get(jti)
            .filter(|c| {
                c.workload == WorkloadId(KernelIds::of(&policy).workload(wid))
                    && c.spiffe_id == policy.workload(wid).spiffe_id
            })
            .ok_or_else(not_found)?;
        // A process-bound credential is its holder's: another process of the same workload
        // that learnt the jti must not end it (a bind: workload credential is everyone's).
        if matches!(c.bind, Bind::Process | Bind::ProcessTree) && c.pid != caller.evidence.pid {
            return Err(Refusal::forbidden(
                "not_the_holder",
                format!(
                    "credential {jti:?} is bound to process {} ({}); only that process, or `tessera revoke`, can end it",
                    c.pid,
                    c.bind.as_str()
                ),
            ));
        }
        if !c.revoked {
            self.revoke_grant(&c).map_err(|e| {
                warn!(error = %e, jti, "cannot revoke a grant");
                Refusal::Internal("the agent could not update the kernel grant".to_owned())
            })?;
            self.registry.mark_revoked(jti);
            info!(jti, workload = %c.spiffe_id, endpoint = %c.audience, pid = caller.evidence.pid, "credential ended by its holder");
            self.revocations.notify_one();
        }
        Ok(c.jti)
    }
}

/// The workload grant's key: a credential's `workload` and `endpoint` are kernel ids.
fn workload_key(c: &CredentialInfo) -> WorkloadGrantKey {
    WorkloadGrantKey {
        workload_id: c.workload.0,
        endpoint_id: c.endpoint.0,
    }
}

/// Now on the kernel's boot clock (`bpf_ktime_get_boot_ns`).
fn boot_time_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        // CLOCK_BOOTTIME exists on every kernel Tessera runs on; 0 yields an already-expired grant.
        Err(_) => 0,
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
