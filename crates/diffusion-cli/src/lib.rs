//! The library side of the `diffusion` binary: the CPU backend's kernels,
//! public so that benches and other programs on burn's Flex backend can
//! install them ([`diffusion_model::kernels`]). Everything else of the
//! command lives in the binary.

#[cfg(feature = "cpu")]
pub mod cpu_kernels;
