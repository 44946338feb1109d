//! Tracepoint field offsets from tracefs `format` files: a classic tracepoint's record layout
//! changes between kernels (6.x moved `sched_process_fork`'s comms to `__data_loc`), so the
//! programs read them at offsets the agent sets when it loads them.

use std::path::Path;

use aya::EbpfLoader;
use tracing::warn;

const EVENTS: &str = "/sys/kernel/tracing/events";

/// (global in the kernel programs, category, event, field, the 6.x offset).
const OFFSETS: [(&str, &str, &str, &str, u32); 2] = [
    (
        "FORK_CHILD_PID_OFFSET",
        "sched",
        "sched_process_fork",
        "child_pid",
        20,
    ),
    (
        "EXEC_OLD_PID_OFFSET",
        "sched",
        "sched_process_exec",
        "old_pid",
        16,
    ),
];

/// Field offsets for the kernel programs' globals, read from this kernel's tracefs (the 6.x
/// value where a format cannot be read: the tracepoint then fails to attach anyway).
pub(super) fn offsets() -> Vec<(&'static str, u32)> {
    OFFSETS
        .iter()
        .map(|&(global, category, event, field, default)| {
            let path = Path::new(EVENTS).join(category).join(event).join("format");
            let offset = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| field_offset(&text, field));
            let offset = offset.unwrap_or_else(|| {
                warn!(format = %path.display(), field, default, "tracepoint field offset not found");
                default
            });
            (global, offset)
        })
        .collect()
}

/// Whether this kernel's tracing programs may call `bpf_get_current_ancestor_cgroup_id`
/// (Linux 5.14 and later); `TESSERA_TRACING_ANCESTORS=0` forces the other way (tests).
pub fn tracing_ancestors() -> bool {
    if std::env::var("TESSERA_TRACING_ANCESTORS").is_ok_and(|v| v == "0") {
        return false;
    }
    super::system::kernel_release().is_none_or(|release| release >= (5, 14))
}

/// The loader's globals: the field offsets, and `TRACING_ANCESTORS`.
pub(super) fn globals() -> Vec<(&'static str, u32)> {
    let mut globals = offsets();
    let ancestors = tracing_ancestors();
    static SAID: std::sync::Once = std::sync::Once::new();
    if !ancestors {
        SAID.call_once(|| {
            warn!(
                "tracing programs find workloads through WORKLOAD_CGROUPS: this kernel's tracing \
             programs lack bpf_get_current_ancestor_cgroup_id (Linux 5.14); at most {} workload \
             cgroups are known to the packet-socket check",
                tessera_common::capacity::WORKLOAD_CGROUPS
            )
        });
    }
    globals.push(("TRACING_ANCESTORS", u32::from(ancestors)));
    globals
}

/// An `EbpfLoader` with the offsets set (they must outlive the loader: hence `offsets`).
pub(super) fn loader<'a>(offsets: &'a [(&'static str, u32)]) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for (global, offset) in offsets {
        loader.override_global(global, offset, true);
    }
    loader
}

/// The offset of `field` in a tracefs `format` text (`field:pid_t child_pid;\toffset:20;…`).
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_18: &str = "name: sched_process_fork\nID: 366\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
        \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
        \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
        \tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
        \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";

    const FORK_5_10: &str = "format:\n\
        \tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;\n\
        \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
        \tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;\n\
        \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";

    #[test]
    fn finds_offsets_of_either_layout() {
        assert_eq!(field_offset(FORK_6_18, "child_pid"), Some(20));
        assert_eq!(field_offset(FORK_6_18, "parent_pid"), Some(12));
        assert_eq!(field_offset(FORK_5_10, "child_pid"), Some(44));
        assert_eq!(field_offset(FORK_5_10, "child_comm"), Some(28));
        assert_eq!(field_offset(FORK_5_10, "pid"), None);
    }

    #[test]
    fn this_kernel_has_the_fields() {
        // tracefs may be unmounted on a build machine: only check what is there.
        for (global, offset) in offsets() {
            assert!(offset >= 8, "{global} = {offset}");
        }
    }
}
