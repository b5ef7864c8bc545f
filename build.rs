//! Compiles `proto/otpgateway/v1/*.proto` with protox (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates the prost messages and tonic services from it.
//! The encoded descriptor set is kept for gRPC server reflection. The ledger's migrations are
//! watched too (they are embedded at compile time).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto/otpgateway/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations at compile time; without this a new or changed
    // migration is not seen until something else in the crate changes.
    println!("cargo:rerun-if-changed=src/store/migrations");

    let descriptors = protox::compile(&files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("otpgateway_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
