//! The floor of any cgroup connect4 program, measured beside the agent's.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

/// The empty program's name, to find its statistics among the host's programs.
const FLOOR_NAME: &str = "tsr_bench_floor";

/// An empty connect4 program (`r0 = 1; exit`) attached through a BPF link to one cgroup: what
/// any cgroup connect program costs at least. Loaded with raw bpf(2) calls (aya loads ELF
/// objects only); the link detaches it when dropped.
pub struct FloorProgram {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl FloorProgram {
    pub fn attach(cgroup: &Path) -> Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
        const BPF_CGROUP_INET4_CONNECT: u32 = 10;
        // mov64 r0, 1; exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        let put32 =
            |a: &mut [u8; 128], at: usize, v: u32| a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        let put64 =
            |a: &mut [u8; 128], at: usize, v: u64| a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
        put32(&mut attr, 4, insns.len() as u32);
        put64(&mut attr, 8, insns.as_ptr() as u64);
        put64(&mut attr, 16, license.as_ptr() as u64);
        attr[48..48 + FLOOR_NAME.len()].copy_from_slice(FLOOR_NAME.as_bytes());
        put32(&mut attr, 68, BPF_CGROUP_INET4_CONNECT);
        let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty connect4 program")?;
        let dir = std::fs::File::open(cgroup)?;
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, prog.as_raw_fd() as u32);
        put32(&mut attr, 4, dir.as_raw_fd() as u32);
        put32(&mut attr, 8, BPF_CGROUP_INET4_CONNECT);
        let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the empty program")?;
        Ok(FloorProgram {
            _prog: prog,
            _link: link,
        })
    }

    /// (run count, run time in ns) of the empty program.
    pub fn stats(&self) -> (u64, u64) {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.name_as_str() == Some(FLOOR_NAME))
            .map(|p| {
                (
                    p.run_count(),
                    u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                )
            })
            .unwrap_or((0, 0))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<OwnedFd> {
    // SAFETY: `attr` is a zero-filled bpf_attr of 128 bytes whose pointers (instructions,
    // license) outlive the call; the kernel returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a file descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
