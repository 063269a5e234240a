//! CPU ops, one family per file. Each file has a plain `*_reference` (naive loops, f64 where it
//! matters: the ground truth) and the fast path the engine runs (vectorised, multithreaded).
//! Both work on flat slices; `tensor::ops` checks shapes and layouts and calls them.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
pub mod act_simd;
pub mod adamw;
pub mod attention;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
pub mod attention_bf16;
pub mod attention_bf16_bwd;
#[cfg(target_arch = "x86_64")]
mod attention_bf16_bwd_fused;
#[cfg(target_arch = "x86_64")]
mod attention_bf16_fused;
pub mod attention_bwd;
pub mod attn_kernel;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
mod bf16_simd;
pub mod cpu_info;
pub mod cpu_path;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod fastmath;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
pub mod gemm_amx;
pub mod gemm_bf16;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
mod gemm_bf16_a;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16_avx512;
#[cfg(target_arch = "x86_64")]
mod gemm_bf16_fp16;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
mod gemm_bf16_pack;
mod gemm_bf16_portable;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
pub mod gemm_epilogue;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut))] // x86-64 kernels cfg'd out elsewhere
pub mod gemm_f32;
pub mod gemm_f32_pack;
pub mod layernorm;
pub mod matmul;
pub mod patch_embed;
pub mod pca;
pub mod pca_grad;
pub mod pos_gather;
pub mod reduce;
pub mod softmax;
pub mod transpose;
