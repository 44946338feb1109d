//! Finding policy files, parsing their YAML documents and computing the revision.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::raw::{FIELD_SETS, RawDocument};
use super::validate::{self, Document};
use super::{PolicyError, PolicyErrors, PolicySet};
use crate::located::yaml_error;

pub(super) fn load(paths: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    let texts = read(paths)?;
    if texts.is_empty() {
        let shown = paths
            .first()
            .map_or_else(|| PathBuf::from("."), PathBuf::clone);
        return Err(PolicyError::whole_file(
            &shown,
            "no policy files found".into(),
            "pass a .yaml/.yml file, or a directory that holds some",
        )
        .into());
    }
    from_texts(&texts)
}

/// Reads the policy files `paths` name (none found is not an error here).
pub(super) fn read(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>, PolicyErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        match policy_files(path) {
            Ok(found) => files.extend(found),
            Err(e) => errors.push(e),
        }
    }
    // The same file named twice (or through a directory too) is loaded once.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    let mut texts = Vec::new();
    for file in files {
        match std::fs::read(&file) {
            Ok(bytes) => texts.push((file, bytes)),
            Err(e) => errors.push(PolicyError::whole_file(
                &file,
                format!("cannot read the file: {e}"),
                "check the path and its permissions",
            )),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    Ok(texts)
}

/// `path` itself, or a directory's `*.yaml` / `*.yml` files sorted by name (not recursive).
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let unreadable = |e: std::io::Error| {
        PolicyError::whole_file(
            path,
            format!("cannot read: {e}"),
            "check the path and its permissions",
        )
    };
    if !std::fs::metadata(path).map_err(unreadable)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let file = entry.path();
        let is_yaml = file
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        // Follows symlinks, as a ConfigMap mounted into a pod is a directory of symlinks.
        if is_yaml && std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and validates files already read; the revision covers their bytes in this order.
pub(super) fn from_texts(texts: &[(PathBuf, Vec<u8>)]) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let mut documents = Vec::new();
    for (file, bytes) in texts {
        let before = documents.len();
        parse_documents(file, bytes, &mut documents, &mut errors);
        if documents.len() == before && !errors.iter().any(|e| e.file == *file) {
            errors.push(PolicyError::whole_file(
                file,
                "the file holds no policy document".into(),
                "add a document with apiVersion: tessera.dev/v1alpha1 and kind: Policy, or remove the file",
            ));
        }
    }
    let validated = validate::validate(&documents, &mut errors);
    if !errors.is_empty() {
        // Files in load order, then by position; validation found them in a different order.
        let order = |f: &Path| texts.iter().position(|(p, _)| p == f);
        errors.sort_by(|a, b| {
            (order(&a.file), a.line, a.column).cmp(&(order(&b.file), b.line, b.column))
        });
        errors.dedup();
        return Err(PolicyErrors(errors));
    }
    // The files' bytes, then each issuance module's hash: editing a module is a new revision.
    let mut hasher = Sha256::new();
    for (_, bytes) in texts {
        hasher.update(bytes);
    }
    for module in &validated.issuance {
        hasher.update(module.sha256.as_bytes());
    }
    let revision = format!("sha256:{}", hex(&hasher.finalize()));
    Ok(PolicySet {
        revision,
        issuance: validated.issuance,
        trusted_issuers: validated.trusted_issuers,
        workloads: validated.workloads,
        endpoints: validated.endpoints,
        rules: validated.rules,
        sources: texts.iter().map(|(p, _)| p.clone()).collect(),
    })
}

/// serde-saphyr's defaults stop at 250k nodes: too few for an allow-list that fills the kernel
/// maps (`tessera_common::capacity`, about 10 nodes an endpoint). The other limits (depth,
/// aliases, input size) keep guarding against amplification.
fn parse_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 8_000_000;
    budget.max_events = 32_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Reads every `---`-separated document; a document that does not deserialize is reported and
/// skipped, and parsing goes on with the next one (a syntax error ends the file).
fn parse_documents<'a>(
    file: &'a Path,
    bytes: &[u8],
    documents: &mut Vec<Document<'a>>,
    errors: &mut Vec<PolicyError>,
) {
    let mut reader = Cursor::new(bytes);
    let docs =
        serde_saphyr::read_with_options::<_, Spanned<RawDocument>>(&mut reader, parse_options());
    for doc in docs {
        match doc {
            Ok(raw) => documents.push(Document { file, raw }),
            Err(e) => errors.push(yaml_error(file, &e, unknown_field)),
        }
    }
}

fn unknown_field(field: &str, expected: &[&str]) -> (String, String) {
    let Some(set) = FIELD_SETS.iter().find(|s| s.fields == expected) else {
        return (
            format!("unknown field `{field}`"),
            format!("allowed: {}", expected.join(", ")),
        );
    };
    let supported: Vec<&str> = set
        .fields
        .iter()
        .copied()
        .filter(|f| !set.unsupported.contains(f))
        .collect();
    let mut hint = format!("allowed: {}", supported.join(", "));
    if !set.unsupported.is_empty() {
        hint.push_str(&format!(
            " ({} {} not supported yet)",
            set.unsupported.join(", "),
            if set.unsupported.len() == 1 {
                "is"
            } else {
                "are"
            }
        ));
    }
    (format!("unknown field `{field}` in {}", set.context), hint)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
