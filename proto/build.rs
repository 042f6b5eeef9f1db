//! Compiles the .proto files with protox (pure Rust), so building pgfleet
//! needs no system `protoc`. The encoded descriptor set is kept for gRPC
//! server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/pgfleet/agent/v1/agent.proto",
    "proto/pgfleet/coordinator/v1/coordinator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("pgfleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // These carry the replication password: their Debug is written by
        // hand (src/redact.rs) so no log line can print it.
        .skip_debug([
            ".pgfleet.agent.v1.PrepareUpstreamRequest",
            ".pgfleet.agent.v1.StartRebuildRequest",
            ".pgfleet.agent.v1.ConfigureStandbyRequest",
            ".pgfleet.agent.v1.RewindRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
