//! Validation of raw documents into the policy's domain types, collecting every error.
//!
//! Items (workloads, endpoints, rules) are checked one by one (`validate/*.rs`); this file
//! checks document headers and what spans items: unique names, SPIFFE IDs and selectors,
//! endpoint keys the kernel could not tell apart, references, and rules that overlap.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};

use super::raw::{RawDocument, RawSpec};
use super::{Endpoint, EndpointId, Mode, PolicyError, Rule, Workload, WorkloadId};
use crate::identity::spiffe::{SpiffeId, TrustDomain};

mod ambiguity;
mod endpoint;
mod fields;
mod issuance;
mod issuers;
mod rule;
mod selectors;
mod workload;

use ambiguity::AmbiguityIndex;
use fields::{API_VERSION, KIND, expect_literal};
use fields::{check_name, parse_mode};

/// One parsed YAML document and the file it came from.
pub(super) struct Document<'a> {
    pub file: &'a Path,
    pub raw: Spanned<RawDocument>,
}

#[derive(Default)]
pub(super) struct Validated {
    pub workloads: Vec<Workload>,
    pub endpoints: Vec<Endpoint>,
    pub rules: Vec<Rule>,
    pub issuance: Vec<std::sync::Arc<super::IssuanceModule>>,
    pub trusted_issuers: Vec<std::sync::Arc<super::TrustedIssuer>>,
}

/// Reports errors against one file.
pub(super) struct Ctx<'a, 'e> {
    file: &'a Path,
    errors: &'e mut Vec<PolicyError>,
}

impl<'a> Ctx<'a, '_> {
    pub fn error(&mut self, loc: Location, message: String, hint: impl Into<String>) {
        self.errors
            .push(PolicyError::at(self.file, loc, message, hint));
    }

    /// An error found elsewhere (e.g. in a Rego module, with its own place).
    pub fn push(&mut self, error: PolicyError) {
        self.errors.push(error);
    }

    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    fn origin(&self, loc: Location) -> Origin<'a> {
        Origin {
            file: self.file,
            loc,
        }
    }
}

/// Where something was defined, to point at it from an error elsewhere.
#[derive(Clone, Copy)]
struct Origin<'a> {
    file: &'a Path,
    loc: Location,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&PolicyError::place(self.file, self.loc))
    }
}

/// Names an item of a document, as rules see them: valid (with its id), or present but
/// invalid (already reported, so a rule naming it is dropped without another error).
pub(super) struct LocalNames<Id> {
    valid: HashMap<String, Id>,
    invalid: HashSet<String>,
}

impl<Id> Default for LocalNames<Id> {
    fn default() -> Self {
        LocalNames {
            valid: HashMap::new(),
            invalid: HashSet::new(),
        }
    }
}

/// What is known across the whole set while its documents are validated in order.
#[derive(Default)]
struct Validator<'a> {
    out: Validated,
    workload_names: HashMap<String, Origin<'a>>,
    endpoint_names: HashMap<String, Origin<'a>>,
    /// Endpoints' `audiences:`, with the endpoint that lists each.
    audiences: HashMap<String, (String, Origin<'a>)>,
    rule_names: HashMap<String, Origin<'a>>,
    /// Trusted issuers' names, and their `issuer`s with the name of the one that has it.
    issuer_names: HashMap<String, Origin<'a>>,
    issuer_urls: HashMap<String, (String, Origin<'a>)>,
    spiffe_ids: HashMap<SpiffeId, (String, Origin<'a>)>,
    /// Every valid workload's selectors, to find ambiguous ones.
    ambiguity: AmbiguityIndex,
    /// Where each valid workload's `match:` is (index = `WorkloadId.0`).
    match_origins: Vec<Origin<'a>>,
    endpoint_keys: HashMap<(IpNet, &'static str, u16), (String, Origin<'a>)>,
    pairs: HashMap<(WorkloadId, EndpointId), (String, Origin<'a>)>,
}

pub(super) fn validate(documents: &[Document<'_>], errors: &mut Vec<PolicyError>) -> Validated {
    let mut validator = Validator::default();
    for doc in documents {
        let mut ctx = Ctx {
            file: doc.file,
            errors,
        };
        validator.document(&mut ctx, &doc.raw);
    }
    validator.out
}

impl<'a> Validator<'a> {
    fn document(&mut self, ctx: &mut Ctx<'a, '_>, doc: &Spanned<RawDocument>) {
        let raw = &doc.value;
        expect_literal(
            ctx,
            raw.api_version.as_ref(),
            doc.referenced,
            "apiVersion",
            API_VERSION,
        );
        expect_literal(ctx, raw.kind.as_ref(), doc.referenced, "kind", KIND);
        if let Some(name) = raw.metadata.as_ref().and_then(|m| m.value.name.as_ref())
            && name.value.trim().is_empty()
        {
            ctx.error(
                name.referenced,
                "metadata.name is empty".into(),
                "give the document a name or remove metadata.name",
            );
        }
        let Some(spec) = &raw.spec else {
            ctx.error(
                doc.referenced,
                "the document has no spec".into(),
                "add spec: with trustDomain, workloads, endpoints and rules",
            );
            return;
        };
        self.spec(ctx, &spec.value, spec.referenced);
    }

    fn spec(&mut self, ctx: &mut Ctx<'a, '_>, spec: &RawSpec, spec_loc: Location) {
        let trust_domain = match &spec.trust_domain {
            None => {
                ctx.error(
                    spec_loc,
                    "spec has no trustDomain".into(),
                    "add trustDomain: example.org (the trust domain of the workloads' SPIFFE IDs)",
                );
                None
            }
            Some(td) => match td.value.parse::<TrustDomain>() {
                Ok(parsed) => Some(parsed),
                Err(e) => {
                    ctx.error(
                        td.referenced,
                        format!("invalid trustDomain `{}`: {e}", td.value),
                        "write a lower-case DNS-like name such as example.org",
                    );
                    None
                }
            },
        };
        let mode = parse_mode(ctx, spec.mode.as_ref()).unwrap_or(Mode::Enforce);
        let module = spec
            .issuance
            .as_ref()
            .and_then(|raw| issuance::check(ctx, raw))
            .map(|m| {
                let id =
                    super::IssuanceId(u32::try_from(self.out.issuance.len()).unwrap_or(u32::MAX));
                self.out.issuance.push(std::sync::Arc::new(m));
                id
            });

        let mut workloads = LocalNames::default();
        for raw in &spec.workloads {
            let before = ctx.error_count();
            let checked = workload::check(ctx, raw, trust_domain.as_ref(), mode);
            let name = raw.value.name.as_ref().map(|n| n.value.clone());
            let match_loc = raw.value.selectors.as_ref().map(|m| m.referenced);
            match checked {
                Some(w) if ctx.error_count() == before => {
                    let locs = (raw.referenced, match_loc.unwrap_or(raw.referenced));
                    if let Some(id) = self.add_workload(ctx, w, locs) {
                        workloads.valid.insert(name.unwrap_or_default(), id);
                        continue;
                    }
                    workloads.invalid.extend(name);
                }
                _ => workloads.invalid.extend(name),
            }
        }

        let mut endpoints = LocalNames::default();
        for raw in &spec.endpoints {
            let before = ctx.error_count();
            let checked = endpoint::check(ctx, raw, mode);
            let name = raw.value.name.as_ref().map(|n| n.value.clone());
            match checked {
                Some(e) if ctx.error_count() == before => {
                    if let Some(id) = self.add_endpoint(ctx, e, raw.referenced) {
                        endpoints.valid.insert(name.unwrap_or_default(), id);
                        continue;
                    }
                    endpoints.invalid.extend(name);
                }
                _ => endpoints.invalid.extend(name),
            }
        }

        let mut issuers = LocalNames::default();
        for raw in &spec.trusted_issuers {
            let name = raw.value.name.as_ref().map(|n| n.value.clone());
            match issuers::check(ctx, raw) {
                Some(t) if self.add_issuer(ctx, &t, raw.referenced) => {
                    issuers.valid.insert(t.name.clone(), ());
                    self.out.trusted_issuers.push(std::sync::Arc::new(t));
                }
                _ => issuers.invalid.extend(name),
            }
        }

        for raw in &spec.rules {
            let before = ctx.error_count();
            let resolver = rule::Resolver {
                workloads: &workloads,
                endpoints: &endpoints,
                issuers: &issuers,
                other_workloads: &self.workload_names,
                other_endpoints: &self.endpoint_names,
            };
            let checked = rule::check(ctx, raw, mode, &resolver);
            if let Some(mut r) = checked
                && ctx.error_count() == before
            {
                // Only rules that issue credentials ask the module.
                r.issuance = module.filter(|_| r.credential.is_some());
                self.add_rule(ctx, r, raw.referenced);
            }
        }
    }

    /// Registers a valid workload unless it clashes with one already in the set. `locs`: the
    /// workload's and its `match:`'s.
    fn add_workload(
        &mut self,
        ctx: &mut Ctx<'a, '_>,
        w: Workload,
        (loc, match_loc): (Location, Location),
    ) -> Option<WorkloadId> {
        let here = ctx.origin(loc);
        if let Some(first) = self.workload_names.get(&w.name) {
            ctx.error(
                loc,
                format!("workload name `{}` is already used at {first}", w.name),
                "workload names must be unique across all policy files; rename one",
            );
            return None;
        }
        if let Some((other, first)) = self.spiffe_ids.get(&w.spiffe_id) {
            ctx.error(
                loc,
                format!(
                    "workload `{}` has the SPIFFE ID {} of workload `{other}` ({first})",
                    w.name, w.spiffe_id
                ),
                "give each workload its own spiffeId",
            );
            return None;
        }
        if let Some(i) = self.ambiguity.find(&w.selectors) {
            let other = &self.out.workloads[i];
            let first = self.match_origins[i];
            let how = if other.selectors == w.selectors {
                "has the same selectors"
            } else {
                "can match the same processes, and neither is more specific"
            };
            ctx.error(
                match_loc,
                format!(
                    "workload `{}` is ambiguous: workload `{}` ({first}) {how}",
                    w.name, other.name
                ),
                "a process must map to one workload; change a selector of one of them so they cannot match the same process, or add one (like uid or exe) to make one more specific",
            );
            return None;
        }
        let index = self.out.workloads.len();
        let id = WorkloadId(u32::try_from(index).ok()?);
        self.workload_names.insert(w.name.clone(), here);
        self.spiffe_ids
            .insert(w.spiffe_id.clone(), (w.name.clone(), here));
        self.ambiguity.insert(&w.selectors, index);
        self.match_origins.push(ctx.origin(match_loc));
        self.out.workloads.push(w);
        Some(id)
    }

    fn add_endpoint(
        &mut self,
        ctx: &mut Ctx<'a, '_>,
        e: Endpoint,
        loc: Location,
    ) -> Option<EndpointId> {
        let here = ctx.origin(loc);
        if let Some(first) = self.endpoint_names.get(&e.name) {
            ctx.error(
                loc,
                format!("endpoint name `{}` is already used at {first}", e.name),
                "endpoint names must be unique across all policy files; rename one",
            );
            return None;
        }
        // An audience names one endpoint: no other's name or audience.
        for a in &e.audiences {
            let clash = self
                .endpoint_names
                .get(a)
                .map(|o| (a.clone(), *o))
                .or_else(|| self.audiences.get(a).map(|(owner, o)| (owner.clone(), *o)));
            if a == &e.name || clash.is_some() {
                let (owner, first) = clash.unwrap_or((e.name.clone(), here));
                ctx.error(
                    loc,
                    format!(
                        "audience `{a}` of endpoint `{}` already names endpoint `{owner}` ({first})",
                        e.name
                    ),
                    "an audience must name one endpoint; remove it or rename one",
                );
                return None;
            }
        }
        if let Some((owner, first)) = self.audiences.get(&e.name) {
            ctx.error(
                loc,
                format!(
                    "endpoint name `{}` is already an audience of endpoint `{owner}` ({first})",
                    e.name
                ),
                "rename the endpoint or remove that audience",
            );
            return None;
        }
        let keys = endpoint::kernel_keys(&e);
        for key in &keys {
            if let Some((other, first)) = self.endpoint_keys.get(key) {
                let (net, protocol, port) = key;
                let port = if *port == 0 {
                    "every port".to_string()
                } else {
                    format!("port {port}")
                };
                ctx.error(
                    loc,
                    format!(
                        "endpoint `{}` overlaps endpoint `{other}` ({first}) on {net} {protocol} {port}",
                        e.name
                    ),
                    "a destination must belong to one endpoint; merge them or narrow one's addresses, ports or protocol",
                );
                return None;
            }
        }
        let id = EndpointId(u32::try_from(self.out.endpoints.len()).ok()?);
        self.endpoint_names.insert(e.name.clone(), here);
        for a in &e.audiences {
            self.audiences.insert(a.clone(), (e.name.clone(), here));
        }
        for key in keys {
            self.endpoint_keys.insert(key, (e.name.clone(), here));
        }
        self.out.endpoints.push(e);
        Some(id)
    }

    /// Registers a trusted issuer unless its name or `issuer` is taken; false if it is.
    fn add_issuer(
        &mut self,
        ctx: &mut Ctx<'a, '_>,
        t: &super::TrustedIssuer,
        loc: Location,
    ) -> bool {
        let here = ctx.origin(loc);
        if let Some(first) = self.issuer_names.get(&t.name) {
            ctx.error(
                loc,
                format!(
                    "trusted issuer name `{}` is already used at {first}",
                    t.name
                ),
                "trusted issuer names must be unique across all policy files; rename one",
            );
            return false;
        }
        if let Some((other, first)) = self.issuer_urls.get(&t.issuer) {
            ctx.error(
                loc,
                format!(
                    "trusted issuer `{}` has the issuer {} of trusted issuer `{other}` ({first})",
                    t.name, t.issuer
                ),
                "a token's `iss` must name one trusted issuer; merge their audiences and keys",
            );
            return false;
        }
        self.issuer_names.insert(t.name.clone(), here);
        self.issuer_urls
            .insert(t.issuer.clone(), (t.name.clone(), here));
        true
    }

    fn add_rule(&mut self, ctx: &mut Ctx<'a, '_>, r: Rule, loc: Location) {
        let here = ctx.origin(loc);
        if let Some(first) = self.rule_names.get(&r.name) {
            ctx.error(
                loc,
                format!("rule name `{}` is already used at {first}", r.name),
                "rule names must be unique across all policy files; rename one",
            );
            return;
        }
        for &w in &r.workloads {
            for &e in &r.endpoints {
                if let Some((other, first)) = self.pairs.get(&(w, e)) {
                    let workload = &self.out.workloads[w.0 as usize].name;
                    let endpoint = &self.out.endpoints[e.0 as usize].name;
                    ctx.error(
                        loc,
                        format!(
                            "rules `{other}` ({first}) and `{}` both cover workload `{workload}` -> endpoint `{endpoint}`",
                            r.name
                        ),
                        "one rule per (workload, endpoint) pair; remove the pair from one of them",
                    );
                    return;
                }
            }
        }
        for &w in &r.workloads {
            for &e in &r.endpoints {
                self.pairs.insert((w, e), (r.name.clone(), here));
            }
        }
        self.rule_names.insert(r.name.clone(), here);
        self.out.rules.push(r);
    }
}

#[cfg(test)]
mod tests;
