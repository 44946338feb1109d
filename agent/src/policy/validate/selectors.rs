//! A workload's `match:`: every selector checked and normalised into [`Selectors`].
//!
//! Values are normalised so that equal selectors compare equal (hashes and container IDs in
//! lower case); anything that could never match a process is refused with a hint.

use serde_saphyr::Spanned;

use super::Ctx;
use crate::identity::evidence::cgroup::systemd_unit;
use crate::identity::selectors::{MIN_CONTAINER_PREFIX, Selectors};
use crate::policy::raw::{RawMatch, S};

mod k8s;

/// `u32::MAX` is the kernel's "any uid" (`tessera_common::ANY_UID`), and `-1` to setuid and
/// setgid, so no workload may use it as a uid or gid.
const MAX_ID: i64 = u32::MAX as i64 - 1;

/// systemd's limit (`UNIT_NAME_MAX` less the NUL).
const MAX_UNIT_NAME: usize = 255;

/// Linux's `PATH_MAX` less the NUL.
const MAX_EXE_PATH: usize = 4095;

/// Full container IDs are 64 hex digits (docker, containerd, CRI-O, podman).
const CONTAINER_ID_LEN: usize = 64;

/// Unit types whose processes live in a cgroup of their own (and so can be matched).
const UNIT_TYPES: &[&str] = &["service", "scope", "slice", "socket", "mount", "swap"];

/// Unit types without processes of their own.
const PROCESSLESS_UNIT_TYPES: &[&str] = &["target", "timer", "path", "device", "automount"];

/// The selectors, or `None` if any is wrong (errors are in `ctx`).
pub(super) fn check_match(ctx: &mut Ctx<'_, '_>, raw: &Spanned<RawMatch>) -> Option<Selectors> {
    let m = &raw.value;
    let mut ok = true;
    let selectors = Selectors {
        cgroup: checked(&mut ok, m.cgroup.as_ref(), |c| check_cgroup(ctx, c)),
        uid: checked(&mut ok, m.uid.as_ref(), |u| check_id(ctx, u, "uid")),
        gid: checked(&mut ok, m.gid.as_ref(), |g| check_id(ctx, g, "gid")),
        systemd_unit: checked(&mut ok, m.systemd_unit.as_ref(), |u| check_unit(ctx, u)),
        exe: checked(&mut ok, m.exe.as_ref(), |e| check_exe(ctx, e)),
        exe_sha256: checked(&mut ok, m.exe_sha256.as_ref(), |h| check_sha256(ctx, h)),
        container: checked(&mut ok, m.container.as_ref(), |c| check_container(ctx, c)),
        k8s: checked(&mut ok, m.k8s.as_ref(), |k| k8s::check(ctx, k)),
    };
    if ok && selectors.is_empty() {
        ctx.error(
            raw.referenced,
            "match has no selector".into(),
            "add at least one of cgroup, uid, gid, systemdUnit, exe, exeSha256, container, k8s",
        );
        return None;
    }
    ok.then_some(selectors)
}

/// `check(raw)` if the selector is written; clears `ok` when it is written but wrong.
fn checked<R, T>(ok: &mut bool, raw: Option<R>, check: impl FnOnce(R) -> Option<T>) -> Option<T> {
    let value = check(raw?);
    *ok &= value.is_some();
    value
}

fn check_id(ctx: &mut Ctx<'_, '_>, raw: &S<i64>, what: &str) -> Option<u32> {
    match u32::try_from(raw.value) {
        Ok(id) if i64::from(id) <= MAX_ID => Some(id),
        _ => {
            ctx.error(
                raw.referenced,
                format!("{what} {} is out of range", raw.value),
                format!("use a {what} from 0 to {MAX_ID}"),
            );
            None
        }
    }
}

/// An absolute, normalised cgroup path below the cgroup v2 root (`/` is the root itself).
fn check_cgroup(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<String> {
    let path = raw.value.as_str();
    let at = raw.referenced;
    if !path.starts_with('/') {
        ctx.error(
            at,
            format!("cgroup `{path}` is not absolute"),
            format!(
                "write it from the cgroup v2 root: /{}",
                path.trim_start_matches("./")
            ),
        );
        return None;
    }
    if path.chars().any(char::is_control) {
        ctx.error(
            at,
            format!("cgroup {path:?} has a control character"),
            "remove it",
        );
        return None;
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.contains(&"..") {
        ctx.error(
            at,
            format!("cgroup `{path}` has a `..` segment"),
            "write the path without `..`",
        );
        return None;
    }
    let normalised = normalised(&segments);
    if normalised != path {
        ctx.error(
            at,
            format!("cgroup `{path}` {}", unnormalised(path)),
            format!("write it normalised: {normalised}"),
        );
        return None;
    }
    Some(normalised)
}

/// `/` and the segments other than `.`, joined by `/`.
fn normalised(segments: &[&str]) -> String {
    let kept: Vec<&str> = segments.iter().copied().filter(|s| *s != ".").collect();
    format!("/{}", kept.join("/"))
}

/// What keeps an absolute path without `..` from being normalised.
fn unnormalised(path: &str) -> &'static str {
    if path.contains("//") {
        "has an empty segment (`//`)"
    } else if path.ends_with('/') {
        "ends with `/`"
    } else {
        "has a `.` segment"
    }
}

/// A unit name as systemd writes it: `name.service`, a template `name@.service`, an instance
/// `name@inst.service`, a scope, a slice (`a-b.slice`, the root `-.slice`), a socket, mount
/// or swap unit. Other unit types have no processes, so a selector on them never matches.
fn check_unit(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<String> {
    let name = raw.value.as_str();
    match unit_problem(name) {
        None => Some(name.to_owned()),
        Some((message, hint)) => {
            ctx.error(raw.referenced, message, hint);
            None
        }
    }
}

/// What is wrong with a `systemdUnit` value, and how to fix it.
fn unit_problem(name: &str) -> Option<(String, String)> {
    let problem = |message: String, hint: &str| Some((message, hint.to_owned()));
    if name.is_empty() {
        return problem(
            "systemdUnit is empty".into(),
            "write a unit name, like payments.service",
        );
    }
    if name.len() > MAX_UNIT_NAME {
        return problem(
            format!("systemdUnit `{name}` is longer than {MAX_UNIT_NAME} characters"),
            "systemd does not allow such names; check the value",
        );
    }
    if let Some(c) = name.chars().find(|c| !unit_char(*c)) {
        return problem(
            format!("systemdUnit `{name}` has the character {c:?}"),
            "unit names have letters, digits and `:_.-\\@`; escape other characters as systemd-escape does",
        );
    }
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return Some((
            format!("systemdUnit `{name}` has no unit type"),
            format!(
                "write the full unit name, like {name}.service (or .scope, .slice, .socket, .mount, .swap)"
            ),
        ));
    };
    if PROCESSLESS_UNIT_TYPES.contains(&suffix) {
        return problem(
            format!("systemdUnit `{name}`: a .{suffix} unit has no processes of its own"),
            "name the unit whose processes should match, like the .service it starts",
        );
    }
    if !UNIT_TYPES.contains(&suffix) {
        return problem(
            format!("systemdUnit `{name}` has the unknown unit type `.{suffix}`"),
            "use a .service, .scope, .slice, .socket, .mount or .swap unit",
        );
    }
    if stem.is_empty() || stem.starts_with('@') {
        return problem(
            format!("systemdUnit `{name}` has no name before `.{suffix}`"),
            "write the unit's name, like payments.service",
        );
    }
    if suffix == "slice" {
        return slice_problem(name, stem);
    }
    match stem.split_once('@') {
        // A template: `name@.service` matches every instance.
        Some((_, "")) => None,
        Some((_, instance)) if instance.contains('@') => problem(
            format!("systemdUnit `{name}` has more than one `@`"),
            "write a template (name@.service) or one instance of it (name@instance.service)",
        ),
        // An agreement with the cgroup parser: what it cannot read would never match.
        _ if systemd_unit(name).is_none() => problem(
            format!("systemdUnit `{name}` is not a unit name the agent can find in a cgroup path"),
            "write the name as `systemctl status` shows it",
        ),
        _ => None,
    }
}

fn slice_problem(name: &str, stem: &str) -> Option<(String, String)> {
    if stem.contains('@') {
        return Some((
            format!("systemdUnit `{name}`: a slice has no templates or instances"),
            "remove the `@`, or name the service or scope".into(),
        ));
    }
    let malformed =
        stem != "-" && (stem.starts_with('-') || stem.ends_with('-') || stem.contains("--"));
    malformed.then(|| {
        (
            format!("systemdUnit `{name}` is not a valid slice name"),
            "a slice's name is its parents' names and its own joined by `-`, like system-getty.slice; the root slice is -.slice".into(),
        )
    })
}

/// As systemd allows in unit names (`VALID_CHARS` and `@`).
fn unit_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '\\' | '@')
}

/// An absolute, normalised file path, as `/proc/PID/exe` shows it.
fn check_exe(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<String> {
    let path = raw.value.as_str();
    let at = raw.referenced;
    let mut refuse = |message: String, hint: String| {
        ctx.error(at, message, hint);
        None
    };
    if path.contains('\0') {
        return refuse(
            format!("exe {path:?} has a NUL character"),
            "remove it".into(),
        );
    }
    if !path.starts_with('/') {
        return refuse(
            format!("exe `{path}` is not absolute"),
            format!(
                "write the executable's full path, like /usr/bin/{}",
                path.trim_start_matches("./")
            ),
        );
    }
    if path.len() > MAX_EXE_PATH {
        return refuse(
            format!("exe is longer than {MAX_EXE_PATH} bytes"),
            "no executable has such a path; check the value".into(),
        );
    }
    if path.ends_with('/') {
        return refuse(
            format!("exe `{path}` ends with `/`"),
            "name the executable file, not a directory".into(),
        );
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.contains(&"..") {
        return refuse(
            format!("exe `{path}` has a `..` segment"),
            "write the path without `..`, as /proc/PID/exe shows it".into(),
        );
    }
    let normalised = normalised(&segments);
    if normalised != path {
        return refuse(
            format!("exe `{path}` {}", unnormalised(path)),
            format!("write it normalised: {normalised}"),
        );
    }
    Some(normalised)
}

/// 64 hex digits, lower-cased.
fn check_sha256(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<String> {
    let text = raw.value.as_str();
    if let Some(rest) = text.strip_prefix("sha256:") {
        ctx.error(
            raw.referenced,
            format!("exeSha256 `{text}` starts with `sha256:`"),
            format!("write the hex digits alone: {rest}"),
        );
        return None;
    }
    if text.len() != 64 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
        ctx.error(
            raw.referenced,
            format!("exeSha256 `{text}` is not 64 hex digits"),
            "write the executable's SHA-256 as `sha256sum /path/to/exe` prints it",
        );
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// A container ID or a prefix of one: hex, lower-cased, 12 to 64 digits.
fn check_container(ctx: &mut Ctx<'_, '_>, raw: &S<String>) -> Option<String> {
    let text = raw.value.as_str();
    let at = raw.referenced;
    if let Some((runtime, id)) = text.split_once("://") {
        ctx.error(
            at,
            format!("container `{text}` starts with the runtime `{runtime}://`"),
            format!("write the ID alone: {id}"),
        );
        return None;
    }
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_hexdigit()) {
        ctx.error(
            at,
            format!("container `{text}` is not a container ID (hex digits)"),
            "write the ID as `docker ps --no-trunc`, `podman ps --no-trunc` or `crictl ps` shows it, or a prefix of at least 12 digits",
        );
        return None;
    }
    if text.len() < MIN_CONTAINER_PREFIX {
        ctx.error(
            at,
            format!(
                "container `{text}` is shorter than {MIN_CONTAINER_PREFIX} hex digits"
            ),
            format!("a prefix this short could name several containers; write at least {MIN_CONTAINER_PREFIX} digits of the ID"),
        );
        return None;
    }
    if text.len() > CONTAINER_ID_LEN {
        ctx.error(
            at,
            format!("container `{text}` is longer than {CONTAINER_ID_LEN} hex digits"),
            "a container ID has 64 hex digits; check the value",
        );
        return None;
    }
    Some(text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests;
