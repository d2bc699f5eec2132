//! Compiles the vendored Envoy rate limit and quota protos (and sluice's own admin proto) with `protox`, a
//! pure-Rust protobuf compiler, so building sluice never needs a system `protoc`. The encoded
//! descriptor set is written next to the generated code for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/rate_limit_quota/v3/rlqs.proto",
    "sluice/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    // Every generated service and client uses sluice's codec: prost, with malformed messages
    // answered as INVALID_ARGUMENT (src/service/codec.rs).
    tonic_prost_build::configure()
        // Maps (an RLQS bucket id) in key order: deterministic encodings, and bucket ids sorted.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .codec_path("crate::service::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
