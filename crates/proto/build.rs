//! Compiles proto/onrec/v1 with protox (pure Rust, no protoc) into prost/tonic code and
//! writes the descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("onrec/v1/onrec.proto");
    println!("cargo:rerun-if-changed={}", root.join("onrec/v1").display());
    println!("cargo:rerun-if-changed={}", file.display());

    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("onrec_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(fds)?;
    Ok(())
}
