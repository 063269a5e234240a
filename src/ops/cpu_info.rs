//! What the CPU backend runs on this machine, for reports (`clipforge bench`'s `cpu` line and
//! JSON object): the CPU's name and the features the kernels care about, the GEMM path
//! [`cpu_path::selected`] takes now, the bf16 GEMM kernel it resolves to, and whether a bf16
//! model's attention takes the bf16 products. A number is only comparable with another taken on
//! the same kind of CPU and path, so the report carries them.
use super::cpu_path::{self, Vendor};
use super::gemm_bf16::{resolve, Kernel};

/// The machine's CPU and the CPU backend's choices on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// CPUID's brand string ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"), trimmed.
    pub name: String,
    /// `intel`, `amd` or `other`.
    pub vendor: &'static str,
    /// AVX512-BF16 (`vdpbf16ps`).
    pub avx512_bf16: bool,
    /// AVX512-FP16.
    pub avx512_fp16: bool,
    /// AMX-BF16 reported by CPUID with the tile state enabled by the OS.
    pub amx_bf16: bool,
    /// The GEMM path now (`CLIPFORGE_CPU_GEMM`'s names: amx, avx512bf16, avx512, scalar).
    pub gemm_path: &'static str,
    /// The kernel bf16 GEMMs run: amx, vdpbf16ps, avx512fp16, avx512-fma, portable.
    pub bf16_kernel: &'static str,
    /// Whether a bf16 model's attention multiplies in bf16 (`attention_bf16::chosen`).
    pub bf16_attention: bool,
}

impl CpuInfo {
    /// This machine, as the backend sees it now (the path may be capped by `CLIPFORGE_CPU_GEMM`).
    pub fn detect() -> CpuInfo {
        #[cfg(target_arch = "x86_64")]
        let (bf16, fp16) = (super::gemm_bf16::has_avx512_bf16(), super::gemm_bf16_fp16::has_avx512_fp16());
        #[cfg(not(target_arch = "x86_64"))]
        let (bf16, fp16) = (false, false);
        CpuInfo {
            name: brand(),
            vendor: match cpu_path::vendor() {
                Vendor::Intel => "intel",
                Vendor::Amd => "amd",
                Vendor::Other => "other",
            },
            avx512_bf16: bf16,
            avx512_fp16: fp16,
            amx_bf16: cpu_path::cpu_has_amx_bf16(),
            gemm_path: cpu_path::selected().name(),
            bf16_kernel: kernel_name(resolve(Kernel::Auto)),
            bf16_attention: super::attention_bf16::chosen(),
        }
    }

    /// One line: `AMD EPYC (amd; avx512bf16, no amx): GEMM path avx512bf16, bf16 GEMMs on vdpbf16ps, bf16 models' attention in bf16`.
    pub fn line(&self) -> String {
        let mut feats = vec![];
        for (on, f) in [(self.avx512_bf16, "avx512bf16"), (self.avx512_fp16, "avx512fp16"), (self.amx_bf16, "amx-bf16")] {
            if on {
                feats.push(f.to_string());
            }
        }
        if !self.amx_bf16 {
            feats.push("no amx".into());
        }
        let attn = if self.bf16_attention { "bf16" } else { "f32" }; // a bf16 model's attention products
        format!(
            "{} ({}; {}): GEMM path {}, bf16 GEMMs on {}, bf16 models' attention in {attn}",
            self.name,
            self.vendor,
            feats.join(", "),
            self.gemm_path,
            self.bf16_kernel
        )
    }

    /// The JSON object of `bench --json`'s `cpu`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "vendor": self.vendor, "avx512_bf16": self.avx512_bf16,
            "avx512_fp16": self.avx512_fp16, "amx_bf16": self.amx_bf16, "gemm_path": self.gemm_path,
            "bf16_kernel": self.bf16_kernel, "bf16_attention": self.bf16_attention,
        })
    }
}

/// A resolved kernel's report name.
fn kernel_name(k: Kernel) -> &'static str {
    match k {
        Kernel::Amx | Kernel::AmxSoft => "amx",
        Kernel::Avx512Bf16 => "vdpbf16ps",
        Kernel::Avx512Fp16 => "avx512fp16",
        Kernel::Avx512Fma => "avx512-fma",
        Kernel::Portable | Kernel::PortableBaseline | Kernel::Auto => "portable",
    }
}

/// CPUID leaves 0x80000002–4 (the brand string), or "unknown CPU" where there are none.
fn brand() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::__cpuid;
        // the brand leaves are read only when leaf 0x80000000 says they exist
        if __cpuid(0x8000_0000).eax < 0x8000_0004 {
            return "unknown CPU".into();
        }
        let b: Vec<u8> = (0x8000_0002u32..=0x8000_0004)
            .flat_map(|l| {
                let r = __cpuid(l);
                [r.eax, r.ebx, r.ecx, r.edx].into_iter().flat_map(|x| x.to_le_bytes())
            })
            .collect();
        let s = String::from_utf8_lossy(&b).trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string();
        if s.is_empty() {
            "unknown CPU".into()
        } else {
            s
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    "unknown CPU".into()
}
