//! `tessera status`: what the running agent enforces, and its counters.
use std::{path::PathBuf, process::ExitCode};

use crate::credential;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The agent's admin socket.
    #[arg(long, default_value = super::DEFAULT_ADMIN_SOCKET, env = "TESSERA_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &StatusArgs) -> ExitCode {
    let status = match credential::admin_status(&args.admin_socket).await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tessera status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{status:#}");
        return ExitCode::SUCCESS;
    }
    let get = |ptr: &str| status.pointer(ptr).cloned().unwrap_or_default();
    println!(
        "attached to:      {}",
        get("/attach_point").as_str().unwrap_or("?")
    );
    println!(
        "mode override:    {}",
        get("/mode_override").as_str().unwrap_or("none")
    );
    println!(
        "policy revision:  {}",
        get("/policy/revision").as_str().unwrap_or("?")
    );
    if let Some(loaded) = get("/policy/loaded_at").as_str() {
        println!("policy loaded:    {loaded}");
    }
    println!(
        "policy:           {} workloads, {} endpoints, {} rules",
        get("/policy/workloads"),
        get("/policy/endpoints"),
        get("/policy/rules")
    );
    println!(
        "decisions:        {} ({} allow, {} deny)",
        get("/counters/decisions"),
        get("/counters/allow"),
        get("/counters/deny")
    );
    println!(
        "dropped events:   {} ({} denies among them, written as counted `lost` records)",
        get("/counters/dropped_events"),
        get("/counters/lost_denies")
    );
    println!("active grants:    {}", get("/grants/active"));
    if let Some(api) = status.pointer("/workload_api") {
        match api["attestation"].as_str() {
            Some(method) => println!("callers proven:   {method}"),
            None => println!(
                "callers proven:   NO: {} (credential requests get 503)",
                api["unavailable"].as_str().unwrap_or("?")
            ),
        }
    }
    match status
        .pointer("/kernel/connection_end")
        .and_then(|m| m.as_str())
    {
        Some("unavailable") => println!(
            "connections end:  NO: this kernel cannot end sockets (connections outlive their credentials)"
        ),
        Some("packet_drop") => println!(
            "connections end:  with their credential (packet_drop: the kernel refuses their packets)"
        ),
        Some(mechanism) => println!("connections end:  with their credential ({mechanism})"),
        None => {}
    }
    if let Some(metrics) = status.pointer("/metrics") {
        println!(
            "metrics:          {}",
            metrics["listen"].as_str().unwrap_or("off")
        );
    }
    println!("programs:");
    if let Some(programs) = status.pointer("/programs").and_then(|p| p.as_array()) {
        for p in programs {
            println!(
                "  {:<24} runs {:>10}  run time {:>12} ns",
                p["name"].as_str().unwrap_or("?"),
                p["run_count"],
                p["run_time_ns"]
            );
        }
    }
    ExitCode::SUCCESS
}
