//! onrec's gRPC contract (`onrec.v1`), generated at build time from `proto/` without protoc.

#![allow(missing_docs, unused_qualifications, clippy::all)]

pub mod codec;

/// Version 1 of the contract: the `Recommender` service and its messages.
pub mod v1 {
    tonic::include_proto!("onrec.v1");

    /// The encoded `FileDescriptorSet` of `onrec.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("onrec_v1_descriptor");
}
