//! Shipping it (unprivileged): the systemd unit passes `systemd-analyze verify`, the
//! Kubernetes manifests pass the Kubernetes JSON schemas (kubernetes-validate), the Helm chart
//! is well formed, the configuration shipped everywhere is valid, and `tessera run` resolves
//! file < environment < flags.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics with context"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tessera_agent::config::FileConfig;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).expect("YAML")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---- systemd ----

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze") {
        tessera_agent::testkit::skip("systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let unit = read("systemd/tessera.service");
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RuntimeDirectory=tessera",
        "StateDirectory=tessera",
        "LogsDirectory=tessera",
        "ProtectSystem=strict",
        "ExecStart=/usr/bin/tessera run --config /etc/tessera/config.yaml",
    ] {
        assert!(unit.contains(must), "the unit lacks {must}");
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tessera.service");
    std::fs::write(&copy, unit.replace("/usr/bin/tessera", TESSERA)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown or misspelt keys are only warnings: treat every message as a failure.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

/// The unit's capability set and the DaemonSet's (plain and Helm) say the same.
#[test]
fn capabilities_agree_everywhere() {
    let unit = read("systemd/tessera.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap();
    let from_unit: BTreeSet<String> = line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    let ds = yaml_docs(&read("deploy/kubernetes/daemonset.yaml"));
    let add = &ds[0]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
        ["add"];
    let from_ds: BTreeSet<String> = serde_json::from_value(add.clone()).unwrap();
    let values = yaml_docs(&read("deploy/helm/tessera/values.yaml"));
    let from_helm: BTreeSet<String> =
        serde_json::from_value(values[0]["capabilities"].clone()).unwrap();
    assert_eq!(from_unit, from_ds);
    assert_eq!(from_unit, from_helm);
}

// ---- Kubernetes ----

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    files
}

fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn kubernetes_manifests_pass_the_schemas() {
    if !have("kubernetes-validate") {
        tessera_agent::testkit::skip(
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
        return;
    }
    let files = manifests();
    assert!(files.len() >= 4, "{files:?}");
    let (ok, out) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate:\n{out}");
    // The validator does catch a misspelt field (strict), so the pass above means something.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read("deploy/kubernetes/daemonset.yaml").replace("hostPID: true", "hostPid: true"),
    )
    .unwrap();
    let (ok, out) = kubernetes_validate(&[bad]);
    assert!(!ok, "a misspelt field passed:\n{out}");
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = yaml_docs(&read("deploy/kubernetes/kustomization.yaml"));
    let listed: BTreeSet<String> = serde_json::from_value(k[0]["resources"].clone()).unwrap();
    let present: BTreeSet<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
}

/// The daemonset's probes, mounts and host access are what the agent needs.
#[test]
fn daemonset_shape() {
    let ds = &yaml_docs(&read("deploy/kubernetes/daemonset.yaml"))[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    let mounts: BTreeSet<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/sys/kernel/tracing",
        "/run/tessera",
        "/etc/tessera/policies",
    ] {
        assert!(mounts.contains(path), "no mount at {path}: {mounts:?}");
    }
    let rbac = yaml_docs(&read("deploy/kubernetes/rbac.yaml"));
    let namespaces = yaml_docs(&read("deploy/kubernetes/namespace.yaml"));
    let role = rbac.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    assert_eq!(role["rules"][0]["resources"][0], "pods");
    let verbs: BTreeSet<String> =
        serde_json::from_value(role["rules"][0]["verbs"].clone()).unwrap();
    assert_eq!(verbs, ["get", "list", "watch"].map(String::from).into());
    let docs: Vec<Value> = rbac.iter().chain(&namespaces).cloned().collect();
    assert_trust_bundle_rbac(ds, &docs, "tessera-trust-bundle", "tessera", "tessera");
}

/// The trust bundle (`--trust-bundle-k8s BUNDLE`): the agent may read, create and patch
/// ConfigMaps in `bundle` only (a Role there, bound to its service account in `agent`), nothing
/// cluster-wide, and not in its own namespace, where the configuration and policies every
/// node's agent reads are.
fn assert_trust_bundle_rbac(ds: &Value, docs: &[Value], bundle: &str, agent: &str, account: &str) {
    assert_ne!(bundle, agent);
    let env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let var = env
        .iter()
        .find(|e| e["name"] == "TESSERA_TRUST_BUNDLE_K8S")
        .unwrap_or_else(|| panic!("no TESSERA_TRUST_BUNDLE_K8S: {env:?}"));
    assert_eq!(var["value"], bundle, "{var}");
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == bundle),
        "the namespace {bundle} is created"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("a Role for the trust bundle");
    assert_eq!(role["metadata"]["namespace"], bundle);
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["apiGroups"], json!([""]));
    assert_eq!(rules[0]["resources"], json!(["configmaps"]));
    let verbs: BTreeSet<String> = serde_json::from_value(rules[0]["verbs"].clone()).unwrap();
    assert_eq!(
        verbs,
        ["get", "list", "watch", "create", "patch"]
            .map(String::from)
            .into()
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding")
        .expect("a RoleBinding for the trust bundle");
    assert_eq!(binding["metadata"]["namespace"], bundle);
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account);
    assert_eq!(binding["subjects"][0]["namespace"], agent);
    let cluster = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    assert!(
        !cluster.to_string().contains("configmaps"),
        "ConfigMaps are not granted cluster-wide: {cluster}"
    );
}

fn check_policy_text(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(TESSERA)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tessera check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn configmap_config_and_policies_are_valid() {
    let docs = yaml_docs(&read("deploy/kubernetes/configmap.yaml"));
    let config = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "tessera-config")
        .unwrap();
    let text = config["data"]["config.yaml"].as_str().unwrap();
    let c = FileConfig::from_bytes(Path::new("configmap:config.yaml"), text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.decision_log.as_deref(), Some("-"));
    // In a pod the agent has a cgroup namespace of its own: it must enter the host's.
    assert_eq!(
        c.cgroup_namespace,
        Some(tessera_agent::daemon::cgroupns::CgroupNamespace::Host)
    );
    assert_eq!(
        c.metrics_listen,
        Some(Some("0.0.0.0:9477".parse().unwrap()))
    );
    let policies = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "tessera-policies")
        .unwrap();
    for (_, text) in policies["data"].as_object().unwrap() {
        check_policy_text(text.as_str().unwrap());
    }
}

// ---- Helm ----

/// `.Values.a.b` references of a template.
fn values_refs(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find(".Values.") {
        rest = &rest[i + ".Values.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        out.push(rest[..end].trim_end_matches('.').to_string());
    }
    out
}

/// Helm cannot be installed here (no registry this machine reaches packages it), so the
/// chart is checked as far as possible without rendering it; `helm template` runs when
/// helm is on the PATH.
#[test]
fn helm_chart_is_well_formed() {
    let chart_dir = root().join("deploy/helm/tessera");
    let chart = &yaml_docs(&read("deploy/helm/tessera/Chart.yaml"))[0];
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "tessera");
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    let values = &yaml_docs(&read("deploy/helm/tessera/values.yaml"))[0];

    let mut defined = BTreeSet::new();
    let mut included = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for entry in std::fs::read_dir(chart_dir.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("{{").count(),
            text.matches("}}").count(),
            "{name}: unbalanced braces"
        );
        // Every block action has its end.
        let actions: Vec<&str> = text
            .split("{{")
            .skip(1)
            .map(|a| a.trim_start_matches('-').trim_start())
            .collect();
        let opens = actions
            .iter()
            .filter(|a| {
                ["if ", "range ", "with ", "define "]
                    .iter()
                    .any(|k| a.starts_with(k))
            })
            .count();
        let ends = actions.iter().filter(|a| a.starts_with("end")).count();
        assert_eq!(opens, ends, "{name}: {opens} blocks, {ends} ends");
        for a in &actions {
            if let Some(d) = a.strip_prefix("define \"") {
                defined.insert(d.split('"').next().unwrap().to_string());
            }
        }
        for part in text.split("include \"").skip(1) {
            included.insert(part.split('"').next().unwrap().to_string());
        }
        for r in values_refs(&text) {
            let pointer = format!("/{}", r.replace('.', "/"));
            assert!(
                values.pointer(&pointer).is_some(),
                "{name}: .Values.{r} is not in values.yaml"
            );
        }
        for line in text.lines() {
            if let Some(kind) = line.strip_prefix("kind: ") {
                kinds.insert(kind.trim().to_string());
            }
        }
    }
    assert!(included.is_subset(&defined), "{included:?} ⊄ {defined:?}");
    let expected: BTreeSet<String> = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        // The trust bundle's namespace, apart from the release's.
        "Namespace",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, expected);
    for (_, text) in values["policies"].as_object().unwrap() {
        check_policy_text(text.as_str().unwrap());
    }
}

/// The helm `cargo xtask test` fetched (`TESSERA_HELM`), or None after reporting the skip.
fn helm() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TESSERA_HELM") {
        return Some(path.into());
    }
    match std::env::var("TESSERA_HELM_UNAVAILABLE") {
        Ok(why) => {
            tessera_agent::testkit::skip_offline(&format!("helm could not be fetched: {why}"))
        }
        Err(_) => tessera_agent::testkit::skip(
            "no helm: run through `cargo xtask test`, which fetches it (or set TESSERA_HELM)",
        ),
    }
    None
}

/// `helm template RELEASE deploy/helm/tessera -n tessera ARGS…`, parsed.
fn helm_template(helm: &Path, release: &str, args: &[&str]) -> (String, Vec<Value>) {
    let out = Command::new(helm)
        .args(["template", release])
        .arg(root().join("deploy/helm/tessera"))
        .args(["--namespace", "tessera"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = yaml_docs(&text)
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    (text, docs)
}

fn kinds_and_names(docs: &[Value]) -> BTreeSet<(String, String)> {
    docs.iter()
        .filter(|d| d["kind"] != "Namespace")
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The admin socket's directory is a volume of its own, not the one workloads mount.
fn assert_admin_socket_apart(docs: &[Value], config_map: &str) {
    let cm = find(docs, "ConfigMap", config_map);
    let text = cm["data"]["config.yaml"].as_str().unwrap();
    let c = FileConfig::from_bytes(Path::new("config.yaml"), text.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let api = c.api_socket.expect("apiSocket");
    let admin = c.admin_socket.expect("adminSocket");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let mount_of = |socket: &Path| -> String {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| socket.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no volume holds {}", socket.display()))
    };
    let (api_volume, admin_volume) = (mount_of(&api), mount_of(&admin));
    assert_ne!(
        api_volume, admin_volume,
        "the admin socket shares the workloads' volume"
    );
    // `tessera status` / `revoke` in the pod find it without a flag.
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "TESSERA_ADMIN_SOCKET"
                && e["value"] == admin.display().to_string()),
        "{env:?}"
    );
}

#[test]
fn plain_manifests_keep_the_admin_socket_apart() {
    let docs: Vec<Value> = manifests()
        .iter()
        .flat_map(|p| yaml_docs(&std::fs::read_to_string(p).unwrap()))
        .collect();
    assert_admin_socket_apart(&docs, "tessera-config");
}

/// The chart, rendered by the real helm: lint, the default values (the same objects as
/// deploy/kubernetes, names that do not stutter), other values and a policy given with
/// --set-file (which replaces the shipped example), each through the Kubernetes schemas and
/// `tessera check`.
#[test]
fn helm_chart_renders_and_validates() {
    let Some(helm) = helm() else {
        return;
    };
    let chart = root().join("deploy/helm/tessera");
    let out = Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(&chart)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint --strict: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let validate = have("kubernetes-validate");
    if !validate {
        tessera_agent::testkit::skip(
            "kubernetes-validate is not installed: the rendered chart is not schema-checked",
        );
    }
    let dir = tempfile::tempdir().unwrap();

    // Defaults: what deploy/kubernetes ships (the CRDs from the chart's crds/), by kind and name.
    let (text, docs) = helm_template(&helm, "tessera", &["--include-crds"]);
    let plain: Vec<Value> = manifests()
        .iter()
        .flat_map(|p| yaml_docs(&std::fs::read_to_string(p).unwrap()))
        .collect();
    assert_eq!(kinds_and_names(&docs), kinds_and_names(&plain));
    assert!(!text.contains("tessera-tessera"), "{text}");
    assert_admin_socket_apart(&docs, "tessera-config");
    assert_trust_bundle_rbac(
        find(&docs, "DaemonSet", "tessera"),
        &docs,
        "tessera-trust-bundle",
        "tessera",
        "tessera",
    );
    let policies = find(&docs, "ConfigMap", "tessera-policies");
    let names: Vec<&String> = policies["data"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["example.yaml"]);
    check_policy_text(policies["data"]["example.yaml"].as_str().unwrap());
    if validate {
        let file = dir.path().join("default.yaml");
        std::fs::write(&file, &text).unwrap();
        let (ok, msg) = kubernetes_validate(&[file]);
        assert!(ok, "default values: {msg}");
    }

    // Another release name, other values, and a policy of the operator's own.
    let mine = dir.path().join("vault.yaml");
    let shipped = yaml_docs(&read("deploy/kubernetes/configmap.yaml"));
    let policy = find(&shipped, "ConfigMap", "tessera-policies")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    std::fs::write(&mine, policy).unwrap();
    let set_file = format!("policies.vault\\.yaml={}", mine.display());
    let (text, docs) = helm_template(
        &helm,
        "edge",
        &[
            "--set",
            "config.mode=enforce,config.metricsPort=9500,hostPaths.run=/var/run/tessera-edge",
            "--set-file",
            &set_file,
        ],
    );
    assert!(text.contains("name: edge-tessera"), "{text}");
    assert_trust_bundle_rbac(
        find(&docs, "DaemonSet", "edge-tessera"),
        &docs,
        "tessera-trust-bundle",
        "tessera",
        "edge-tessera",
    );
    // Switched off: no Role, no variable.
    let (_, off) = helm_template(&helm, "tessera", &["--set", "trustBundleK8s=false"]);
    assert!(
        off.iter()
            .all(|d| d["kind"] != "Role" && d["kind"] != "RoleBinding")
    );
    let env =
        find(&off, "DaemonSet", "tessera")["spec"]["template"]["spec"]["containers"][0]["env"]
            .to_string();
    assert!(!env.contains("TESSERA_TRUST_BUNDLE_K8S"), "{env}");
    assert_admin_socket_apart(&docs, "edge-tessera-config");
    let policies = find(&docs, "ConfigMap", "edge-tessera-policies");
    let names: Vec<&String> = policies["data"].as_object().unwrap().keys().collect();
    assert_eq!(
        names,
        ["vault.yaml"],
        "the example must give way to the given policy"
    );
    check_policy_text(policies["data"]["vault.yaml"].as_str().unwrap());
    let config = find(&docs, "ConfigMap", "edge-tessera-config")["data"]["config.yaml"]
        .as_str()
        .unwrap();
    let c = FileConfig::from_bytes(Path::new("config.yaml"), config.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.metrics_listen,
        Some(Some("0.0.0.0:9500".parse().unwrap()))
    );
    assert!(config.contains("mode: enforce"), "{config}");
    if validate {
        let file = dir.path().join("edge.yaml");
        std::fs::write(&file, &text).unwrap();
        let (ok, msg) = kubernetes_validate(&[file]);
        assert!(ok, "non-default values: {msg}");
    }
}

// ---- policy custom resources ----

/// `tessera crds` as committed: the plain manifests and the chart's crds/ hold what it prints.
#[test]
fn committed_crds_are_the_generated_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    for file in [
        "deploy/kubernetes/crds.yaml",
        "deploy/helm/tessera/crds/crds.yaml",
    ] {
        assert!(
            read(file) == generated,
            "{file} is not what `tessera crds` prints: run `cargo xtask crds`"
        );
    }
    let docs = yaml_docs(&generated);
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                d["spec"]["names"]["kind"].as_str().unwrap(),
                d["spec"]["scope"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("TesseraPolicy", "Cluster"),
            ("TesseraNamespacedPolicy", "Namespaced")
        ]
    );
    for doc in &docs {
        let version = &doc["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_structural(spec, "spec");
        // `kubectl explain` reads the descriptions.
        let max_ttl = &spec["properties"]["rules"]["items"]["properties"]["credential"]["properties"]
            ["maxTtl"];
        assert_eq!(max_ttl["type"], "string");
        assert!(
            max_ttl["description"]
                .as_str()
                .is_some_and(|d| d.contains("24h"))
        );
    }
    // Every field the shipped example policies use is in the schema (the API server would
    // drop one that is not).
    let spec = &docs[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for doc in yaml_docs(&std::fs::read_to_string(&path).unwrap()) {
            assert_fields_known(&doc["spec"], spec, &format!("{}: spec", path.display()));
            checked += 1;
        }
    }
    assert!(checked > 0);
}

/// What the API server requires of a CRD schema: a type on every node, no references, no
/// open objects where the spec has fields.
fn assert_structural(schema: &Value, path: &str) {
    let object = schema
        .as_object()
        .unwrap_or_else(|| panic!("{path}: {schema}"));
    assert!(
        object.get("type").is_some_and(Value::is_string),
        "{path} has no single type: {schema}"
    );
    for key in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "nullable",
        "x-kubernetes-preserve-unknown-fields",
    ] {
        assert!(!object.contains_key(key), "{path} has {key}");
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            assert_structural(child, &format!("{path}.{name}"));
        }
    }
    if let Some(items) = object.get("items") {
        assert_structural(items, &format!("{path}[]"));
    }
    if let Some(values @ Value::Object(_)) = object.get("additionalProperties") {
        assert_structural(values, &format!("{path}.*"));
    }
}

fn assert_fields_known(value: &Value, schema: &Value, path: &str) {
    match value {
        Value::Object(fields) => {
            for (name, child) in fields {
                let sub = schema["properties"]
                    .get(name)
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or_else(|| panic!("{path}.{name} is not in the CRD schema"));
                assert_fields_known(child, sub, &format!("{path}.{name}"));
            }
        }
        Value::Array(items) => {
            for item in items {
                assert_fields_known(item, &schema["items"], &format!("{path}[]"));
            }
        }
        _ => {}
    }
}

// ---- configuration precedence, end to end ----

fn print_config(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(TESSERA);
    cmd.arg("run").args(args).arg("--print-config");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TESSERA_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_settings_come_from_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        "policies: [policies]\nmode: audit\nstateDir: /file/state\nlogFormat: json\n\
         decisionLog:\n  path: /file/decisions.jsonl\n  keep: 3\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = print_config(&["--config", f], &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["configFile"], f);
    assert_eq!(v["mode"], "audit");
    assert_eq!(
        v["policies"][0],
        dir.path().join("policies").display().to_string()
    );
    assert_eq!(v["decisionLog"]["keep"], 3);
    assert_eq!(v["metrics"]["listen"], "127.0.0.1:9477");
    assert_eq!(v["cgroupNamespace"], "inherit");

    let (_, out, _) = print_config(
        &["--config", f],
        &[
            ("TESSERA_MODE", "enforce"),
            ("TESSERA_STATE_DIR", "/env/state"),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "enforce");
    assert_eq!(v["stateDir"], "/env/state");
    assert_eq!(v["cgroupNamespace"], "inherit");
    let (_, out, _) = print_config(&["--config", f], &[("TESSERA_CGROUP_NAMESPACE", "host")]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cgroupNamespace"], "host");
    assert_eq!(v["logFormat"], "json");

    let (_, out, _) = print_config(
        &["--config", f, "--mode", "audit", "--metrics-addr", "off"],
        &[
            ("TESSERA_MODE", "enforce"),
            ("TESSERA_METRICS_ADDR", "127.0.0.1:1"),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mode"], "audit");
    assert_eq!(v["metrics"]["listen"], Value::Null);

    // TESSERA_CONFIG names the file too.
    let (_, out, _) = print_config(&[], &[("TESSERA_CONFIG", f)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stateDir"], "/file/state");
}

#[test]
fn a_bad_configuration_is_refused_with_every_error_placed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        "mode: strict\nmetrics:\n  listen: nowhere\n  path: /m\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = print_config(&["--config", f], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("{f}:4:3: unknown setting `path`")),
        "{err}"
    );
    let (code, _, err) = print_config(&["--config", &format!("{f}.absent")], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the configuration file"), "{err}");
    std::fs::write(&file, "mode: strict\nmetrics:\n  listen: nowhere\n").unwrap();
    let (code, _, err) = print_config(&["--config", f], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{f}:1:7: unknown mode `strict` — ")),
        "{err}"
    );
    assert!(err.contains(&format!("{f}:3:11: ")), "{err}");
}

#[test]
fn the_shipped_config_file_is_valid() {
    let path = root().join("packaging/config.yaml");
    FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = print_config(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decisionLog"]["maxAge"], "1day");
}
