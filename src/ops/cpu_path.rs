//! Which CPU GEMM path runs: what the CPU (and the OS) can execute, capped by the
//! `CLIPFORGE_CPU_GEMM` environment variable or [`force_path`], decided once per process.
//!
//! Paths, fastest first ([`GemmPath`]):
//! * `amx`: AMX-BF16 tiles for bf16 GEMMs (`src/ops/gemm_amx.rs`). Needs CPUID's AMX-TILE and
//!   AMX-BF16 bits, the OS enabling the tile state in XCR0, and Linux granting it to this process
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, requested once, here). If any of these
//!   fail the next path runs and one line says why (stderr, once).
//! * `avx512bf16`: `vdpbf16ps` for bf16 GEMMs (`src/ops/gemm_bf16.rs`) where it pays (AMD; see
//!   [`bf16_dot_pays`]), else (Intel) the bf16 inputs as scaled f16 through AVX512-FP16 where the
//!   CPU has it (`src/ops/gemm_bf16_fp16.rs`: f16 partial sums of 128 products, ≈ 1.8× the FMAs),
//!   else bf16 inputs through AVX-512F f32 FMAs.
//! * `avx512`: the hand-written AVX-512F f32 GEMM (`src/ops/gemm_f32.rs`); bf16 GEMMs run bf16
//!   inputs through AVX-512F f32 FMAs (f32 sums: `CLIPFORGE_CPU_GEMM=avx512` also turns the
//!   AVX512-FP16 kernel off).
//! * `scalar`: no hand-written SIMD kernel: f32 through faer, bf16 through the portable kernel's
//!   baseline build.
//!
//! `CLIPFORGE_CPU_GEMM=avx512bf16` (say) forces that path *or a lower one* when the CPU lacks it,
//! so tests and benchmarks can run every path the machine has.
//!
//! Tests on CPUs without AMX may declare the tile instructions emulated ([`assume_amx_emulated`]:
//! tests/amx_trap/ executes them in a SIGILL handler), so that the real AMX code path — the
//! instructions as compiled — runs end to end.
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

/// A CPU GEMM path; the order is the preference order (higher is faster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GemmPath {
    /// No hand-written SIMD kernel (faer for f32, the portable baseline build for bf16).
    Scalar = 0,
    /// AVX-512F f32 kernel; bf16 inputs through AVX-512F f32 FMAs.
    Avx512 = 1,
    /// AVX512-BF16 (`vdpbf16ps`) for bf16.
    Avx512Bf16 = 2,
    /// AMX-BF16 tiles for bf16.
    Amx = 3,
}

impl GemmPath {
    /// The name used by `CLIPFORGE_CPU_GEMM`.
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Scalar => "scalar",
            GemmPath::Avx512 => "avx512",
            GemmPath::Avx512Bf16 => "avx512bf16",
            GemmPath::Amx => "amx",
        }
    }
    /// Parses a `CLIPFORGE_CPU_GEMM` value.
    pub fn parse(s: &str) -> Option<GemmPath> {
        [GemmPath::Scalar, GemmPath::Avx512, GemmPath::Avx512Bf16, GemmPath::Amx].into_iter().find(|p| p.name() == s.trim().to_ascii_lowercase())
    }
    fn from_u8(v: u8) -> GemmPath {
        match v {
            0 => GemmPath::Scalar,
            1 => GemmPath::Avx512,
            2 => GemmPath::Avx512Bf16,
            _ => GemmPath::Amx,
        }
    }
}

/// CPUID leaf 7 (sub-leaf 0) says AMX-TILE and AMX-BF16, and XCR0 has the tile state enabled.
pub fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
        // SAFETY: cpuid exists on every x86-64 CPU; leaf 7 is queried only when the maximum leaf
        // allows it; xgetbv only when CPUID says OSXSAVE (leaf 1 ECX bit 27).
        unsafe {
            if __cpuid(0).eax < 7 || __cpuid(1).ecx & (1 << 27) == 0 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            let (tile, bf16) = (edx & (1 << 24) != 0, edx & (1 << 22) != 0);
            // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves the tile state.
            tile && bf16 && (_xgetbv(0) >> 17) & 3 == 3
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks Linux for the AMX tile-data state (once per process; every thread may then use it).
/// `Err` carries the reason for the log line.
fn request_amx_permission() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permitted
        // extended-state set; it takes no pointers.
        let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {}", std::io::Error::last_os_error()))
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    Err("AMX is used on Linux only".into())
}

/// The fastest path this CPU and OS can run (asks for the AMX permission the first time).
pub fn detected() -> GemmPath {
    static DETECTED: OnceLock<GemmPath> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        if cpu_has_amx_bf16() {
            match request_amx_permission() {
                Ok(()) => return GemmPath::Amx,
                Err(why) => eprintln!("clipforge: AMX-BF16 reported by the CPU but not usable ({why}); using AVX512-BF16"),
            }
        }
        if crate::ops::gemm_bf16::has_avx512_bf16() {
            GemmPath::Avx512Bf16
        } else if crate::ops::gemm_f32::available() {
            GemmPath::Avx512
        } else {
            GemmPath::Scalar
        }
    })
}

static AMX_EMULATED: AtomicBool = AtomicBool::new(false);

/// From now on the AMX path is usable on this CPU whatever CPUID says ([`usable`]): `Kernel::Amx`
/// and the selection run the real tile instructions (`gemm_amx::HwTiles`). For tests only.
///
/// # Safety
/// The AMX-TILE/AMX-BF16 instructions must not fault from now on: on a CPU without AMX the caller
/// has installed an emulator of them (tests/amx_trap/: a SIGILL handler that decodes and executes
/// each one). Without it the next AMX GEMM dies of SIGILL.
#[doc(hidden)]
pub unsafe fn assume_amx_emulated() {
    AMX_EMULATED.store(true, Ordering::Relaxed);
}

/// The fastest path GEMMs may take here: [`detected`], or `Amx` after [`assume_amx_emulated`].
pub fn usable() -> GemmPath {
    if AMX_EMULATED.load(Ordering::Relaxed) {
        GemmPath::Amx
    } else {
        detected()
    }
}

const UNSET: u8 = u8::MAX;
static FORCED: AtomicU8 = AtomicU8::new(UNSET);

/// The cap from `CLIPFORGE_CPU_GEMM` (read once; an unknown value is reported once and ignored).
fn env_cap() -> GemmPath {
    static CAP: OnceLock<GemmPath> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("CLIPFORGE_CPU_GEMM") {
        Ok(v) if !v.is_empty() => GemmPath::parse(&v).unwrap_or_else(|| {
            eprintln!("clipforge: CLIPFORGE_CPU_GEMM={v:?} is not one of amx, avx512bf16, avx512, scalar; ignored");
            GemmPath::Amx
        }),
        _ => GemmPath::Amx,
    })
}

/// Caps the path for the rest of the process (`None`: back to the environment's cap). For tests
/// and benchmarks; GEMMs already running are not affected.
pub fn force_path(cap: Option<GemmPath>) {
    FORCED.store(cap.map_or(UNSET, |p| p as u8), Ordering::Relaxed);
}

fn cap() -> GemmPath {
    match FORCED.load(Ordering::Relaxed) {
        UNSET => env_cap(),
        v => GemmPath::from_u8(v),
    }
}

/// The path GEMMs take now: the [`usable`] one, capped by [`force_path`] or `CLIPFORGE_CPU_GEMM`.
pub fn selected() -> GemmPath {
    usable().min(cap())
}

/// Whether `vdpbf16ps` beats f32 FMAs on bf16 inputs here, when AMX is not used: on AMD (Zen 4/5:
/// one `vdpbf16ps` does the work of two FMAs at the same rate) it does; on Intel's AVX512-BF16
/// parts it issues on one port while FMAs issue on two, so the same products through f32 FMAs
/// are faster (measured 0.71× for `vdpbf16ps` at 1024³ on a Xeon VM). Forcing
/// `CLIPFORGE_CPU_GEMM=avx512bf16` selects `vdpbf16ps` anyway.
pub fn bf16_dot_pays() -> bool {
    vendor() == Vendor::Amd || cap() == GemmPath::Avx512Bf16
}

/// The CPU's vendor, as far as the tunings care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// CPUID leaf 0's vendor string (read once).
pub fn vendor() -> Vendor {
    static V: OnceLock<Vendor> = OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let r = core::arch::x86_64::__cpuid(0); // leaf 0 exists on every x86-64 CPU
            let v: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|x| x.to_le_bytes()).collect();
            match v.as_slice() {
                b"GenuineIntel" => return Vendor::Intel,
                b"AuthenticAMD" => return Vendor::Amd,
                _ => {}
            }
        }
        Vendor::Other
    })
}
