//! Kernel module loading and caching.
//!
//! Each kernel file is described by a [`ModuleSpec`]: cubins built ahead of time per SM
//! (build.rs + nvcc), optionally a PTX image, the CUDA source with its embedded headers, and its
//! entry points. Loading tries, in order:
//! 1. the cubin for the device's SM (exact, else the newest same-major cubin with a lower minor;
//!    list an arch-specific `sm_90a` cubin as 90 — it is then only chosen on sm_90 itself);
//! 2. the embedded PTX (JIT-compiled by the driver);
//! 3. NVRTC (`nvrtc.rs`): the source with its local includes inlined, compiled for `compute_XY`
//!    (clamped to what this NVRTC supports), the PTX cached on disk under
//!    `$XDG_CACHE_HOME/clipforge/ptx/` (else `~/.cache/clipforge/ptx/`), keyed by a hash of
//!    (source, arch, NVRTC version, options) and written atomically (temp file + rename).
//!    A cached file that fails to load is recompiled and overwritten.
//!
//! A step that fails falls through to the next (e.g. a cubin from a newer toolkit than the
//! driver); the final error lists every attempt. Loaded modules and looked-up functions are kept
//! in in-memory maps. Kernel names are `"module::function"` or a bare `"function"`, found through
//! the specs' `entry_points` (or, for specs without entry points, by trying each in turn).
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::device::guarded;
use super::nvrtc;
use crate::error::{Error, Result};

/// One kernel translation unit (one .cu file) and its prebuilt images.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub name: &'static str,
    /// `(sm, cubin)`, e.g. `(80, sm_80 cubin)`, `(90, sm_90a cubin)`.
    pub cubins: Vec<(u32, &'static [u8])>,
    pub ptx: Option<&'static str>,
    /// CUDA C++ source; local `#include "x"` lines are served from `headers` under NVRTC.
    pub source: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
    /// The module's `extern "C"` kernels (empty = unknown, looked up by trying).
    pub entry_points: &'static [&'static str],
}

impl ModuleSpec {
    pub fn new(name: &'static str, cubin_by_arch: &[(u32, &'static [u8])], ptx: Option<&'static str>, source: &'static str) -> Self {
        Self { name, cubins: cubin_by_arch.to_vec(), ptx, source, headers: &[], entry_points: &[] }
    }
    pub fn with_headers(mut self, headers: &'static [(&'static str, &'static str)]) -> Self {
        self.headers = headers;
        self
    }
    pub fn with_entry_points(mut self, entry_points: &'static [&'static str]) -> Self {
        self.entry_points = entry_points;
        self
    }
}

/// Where a loaded module came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleOrigin {
    Cubin(u32),
    EmbeddedPtx,
    NvrtcDiskCache(PathBuf),
    NvrtcCompiled { arch: u32, cached_at: Option<PathBuf> },
}

/// The cubin to load on an `sm` device: exact match, else the highest same-major lower-minor one.
pub fn select_cubin(cubins: &[(u32, &'static [u8])], sm: u32) -> Option<(u32, &'static [u8])> {
    if let Some(&(s, b)) = cubins.iter().find(|(s, _)| *s == sm) {
        return Some((s, b));
    }
    cubins.iter().filter(|(s, _)| s / 10 == sm / 10 && *s <= sm).max_by_key(|(s, _)| *s).copied()
}

/// `$XDG_CACHE_HOME/clipforge/ptx` if that is an absolute path, else `$HOME/.cache/clipforge/ptx`.
pub fn cache_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let base =
        xdg_cache_home.map(PathBuf::from).filter(|p| p.is_absolute()).or_else(|| home.filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("clipforge").join("ptx"))
}

/// [`cache_dir_from`] applied to the process environment.
pub fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// Stable 64-bit FNV-1a over length-prefixed fields (std's hashers are not stable across Rust
/// releases, which a disk cache needs).
pub fn cache_key(source: &str, arch: u32, nvrtc_version: (i32, i32), options: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(b"clipforge-ptx-v1");
    feed(source.as_bytes());
    feed(&arch.to_le_bytes());
    feed(&nvrtc_version.0.to_le_bytes());
    feed(&nvrtc_version.1.to_le_bytes());
    for o in options {
        feed(o.as_bytes());
    }
    h
}

/// `"<name>-compute_<arch>-<key>.ptx"`, with the module name reduced to `[A-Za-z0-9-]` and `_`.
pub fn cache_file_name(module: &str, arch: u32, key: u64) -> String {
    let safe: String = module.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{safe}-compute_{arch}-{key:016x}.ptx")
}

/// Writes `bytes` to `path` atomically: a unique temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A cached PTX file's text, if it exists and looks like PTX (no NUL, has a `.version`).
pub fn read_cached_ptx(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim_end_matches('\0');
    (!text.contains('\0') && text.contains(".version")).then(|| text.to_string())
}

/// `"mod::fn"` → `(Some("mod"), "fn")`, `"fn"` → `(None, "fn")`.
pub fn split_kernel_name(kernel: &str) -> (Option<&str>, &str) {
    match kernel.split_once("::") {
        Some((m, f)) => (Some(m), f),
        None => (None, kernel),
    }
}

/// Modules to look in for `kernel`: the named one; else those listing the function as an entry
/// point; else those that list no entry points at all.
pub fn candidate_modules<'a>(specs: &'a [ModuleSpec], kernel: &str) -> Vec<&'a str> {
    let names = |f: &dyn Fn(&ModuleSpec) -> bool| specs.iter().filter(|s| f(s)).map(|s| s.name).collect::<Vec<_>>();
    match split_kernel_name(kernel) {
        (Some(m), _) => names(&|s| s.name == m),
        (None, f) => {
            let listed = names(&|s| s.entry_points.contains(&f));
            if listed.is_empty() {
                names(&|s| s.entry_points.is_empty())
            } else {
                listed
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Loaded = (Arc<CudaModule>, ModuleOrigin);

/// Registered kernel modules, loaded lazily into one context, plus a function-handle cache.
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    sm: u32,
    cache_dir: Option<PathBuf>,
    nvrtc_options: Vec<String>,
    registry: Mutex<Vec<ModuleSpec>>,
    modules: Mutex<HashMap<String, Loaded>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl ModuleCache {
    /// `sm` is the device's `10*major+minor` (`CudaDevice::sm()`).
    pub fn new(ctx: Arc<CudaContext>, sm: u32) -> Self {
        Self {
            ctx,
            sm,
            cache_dir: default_cache_dir(),
            nvrtc_options: Vec::new(),
            registry: Mutex::new(Vec::new()),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }
    /// Overrides the PTX disk cache directory (`None` disables the disk cache).
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }
    /// Extra NVRTC options (e.g. `"--use_fast_math"`), part of the cache key.
    pub fn with_nvrtc_options(mut self, opts: Vec<String>) -> Self {
        self.nvrtc_options = opts;
        self
    }
    pub fn sm(&self) -> u32 {
        self.sm
    }

    /// Adds (or replaces, by name) a module description; nothing is loaded yet.
    pub fn register(&self, spec: ModuleSpec) {
        let mut reg = lock(&self.registry);
        reg.retain(|r| r.name != spec.name);
        reg.push(spec);
    }

    /// Where module `name` was loaded from, if it has been loaded.
    pub fn origin(&self, name: &str) -> Option<ModuleOrigin> {
        lock(&self.modules).get(name).map(|l| l.1.clone())
    }

    /// The loaded module `name`, loading it on first use.
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>> {
        let spec =
            lock(&self.registry).iter().find(|m| m.name == name).cloned().ok_or_else(|| Error::device(format!("kernel module '{name}' is not registered")))?;
        let mut mods = lock(&self.modules);
        if let Some((m, _)) = mods.get(name) {
            return Ok(Arc::clone(m));
        }
        let loaded = self.load(&spec)?; // under the lock: one compile per module
        let m = Arc::clone(&loaded.0);
        mods.insert(name.to_string(), loaded);
        Ok(m)
    }

    /// Function handle for `kernel` (see [`candidate_modules`]); cached by the exact string.
    pub fn function(&self, kernel: &str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(kernel) {
            return Ok(f.clone());
        }
        let names: Vec<String> = candidate_modules(&lock(&self.registry), kernel).into_iter().map(String::from).collect();
        if names.is_empty() {
            return Err(Error::device(format!("kernel '{kernel}': no registered module provides it")));
        }
        let func = split_kernel_name(kernel).1;
        let mut errs = Vec::new();
        for name in names {
            let m = self.module(&name)?;
            match guarded("cuModuleGetFunction", || m.load_function(func)) {
                Ok(f) => {
                    lock(&self.functions).insert(kernel.to_string(), f.clone());
                    return Ok(f);
                }
                Err(e) => errs.push(format!("{name}: {}", e.message())),
            }
        }
        Err(Error::device(format!("kernel '{kernel}' not found ({})", errs.join("; "))))
    }

    fn load_image(&self, ptx: Ptx) -> Result<Arc<CudaModule>> {
        guarded("cuModuleLoadData", || self.ctx.load_module(ptx))
    }

    fn load(&self, m: &ModuleSpec) -> Result<Loaded> {
        let mut errs = Vec::new();
        if let Some((sm, bin)) = select_cubin(&m.cubins, self.sm) {
            match self.load_image(Ptx::from_binary(bin.to_vec())) {
                Ok(module) => return Ok((module, ModuleOrigin::Cubin(sm))),
                Err(e) => errs.push(format!("cubin sm_{sm}: {}", e.message())),
            }
        }
        if let Some(ptx) = m.ptx {
            match self.load_image(Ptx::from_src(ptx)) {
                Ok(module) => return Ok((module, ModuleOrigin::EmbeddedPtx)),
                Err(e) => errs.push(format!("embedded PTX: {}", e.message())),
            }
        }
        self.load_nvrtc(m).map_err(|e| {
            errs.push(format!("NVRTC: {}", e.message()));
            Error::device(format!("cannot load kernel module '{}' on sm_{}: {}", m.name, self.sm, errs.join(" | ")))
        })
    }

    fn load_nvrtc(&self, m: &ModuleSpec) -> Result<Loaded> {
        let version = nvrtc::nvrtc_version()?;
        let arch = nvrtc::nvrtc_arch(self.sm, &nvrtc::nvrtc_supported_archs())
            .ok_or_else(|| Error::device(format!("NVRTC {}.{} cannot target sm_{} or older", version.0, version.1, self.sm)))?;
        let (source, options) = nvrtc_inputs(m, arch, &self.nvrtc_options)?;
        let key = cache_key(&source, arch, version, &options);
        let path = self.cache_dir.as_ref().map(|d| d.join(cache_file_name(m.name, arch, key)));
        if let Some((p, text)) = path.as_ref().and_then(|p| read_cached_ptx(p).map(|t| (p, t))) {
            if let Ok(module) = self.load_image(Ptx::from_src(text)) {
                return Ok((module, ModuleOrigin::NvrtcDiskCache(p.clone())));
            }
        }
        let text = nvrtc::compile(m.name, &source, options)?;
        let module = self.load_image(Ptx::from_src(text.clone()))?;
        let cached_at = path.filter(|p| write_atomic(p, text.as_bytes()).is_ok());
        Ok((module, ModuleOrigin::NvrtcCompiled { arch, cached_at }))
    }
}

/// The source (local headers inlined) and options NVRTC compiles module `m` with for `arch`.
pub fn nvrtc_inputs(m: &ModuleSpec, arch: u32, extra: &[String]) -> Result<(String, Vec<String>)> {
    let source = nvrtc::inline_includes(m.source, m.headers)?;
    Ok((source, nvrtc::compile_options(arch, nvrtc::cuda_include_dir().as_deref(), extra)))
}

/// NVRTC's PTX for module `m` at `arch`, exactly as the loader's fallback compiles it (no cache,
/// no device needed: tests/nvrtc.rs runs this for every module).
pub fn nvrtc_ptx(m: &ModuleSpec, arch: u32, extra: &[String]) -> Result<String> {
    let (source, options) = nvrtc_inputs(m, arch, extra)?;
    nvrtc::compile(m.name, &source, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    static A: &[u8] = b"a";
    static B: &[u8] = b"b";
    static C: &[u8] = b"c";

    #[test]
    fn cubin_selection() {
        let cubins: &[(u32, &'static [u8])] = &[(80, A), (86, B), (90, C)];
        assert_eq!(select_cubin(cubins, 90).map(|c| c.0), Some(90));
        assert_eq!(select_cubin(cubins, 86).map(|c| c.0), Some(86));
        assert_eq!(select_cubin(cubins, 89).map(|c| c.0), Some(86)); // same major, lower minor
        assert_eq!(select_cubin(cubins, 87).map(|c| c.1), Some(B));
        assert_eq!(select_cubin(cubins, 75), None);
        assert_eq!(select_cubin(cubins, 100), None); // never across majors
        assert_eq!(select_cubin(&[(120, A)], 121).map(|c| c.0), Some(120));
        assert_eq!(select_cubin(&[], 90), None);
    }

    #[test]
    fn kernel_lookup_candidates() {
        let specs = [
            ModuleSpec::new("layernorm", &[], None, "").with_entry_points(&["layernorm_fwd_f32", "layernorm_bwd_f32"]),
            ModuleSpec::new("bias_gelu", &[(80, A)], None, "").with_entry_points(&["bias_gelu_fwd_f32"]),
            ModuleSpec::new("misc", &[], None, ""),
        ];
        assert_eq!(candidate_modules(&specs, "bias_gelu_fwd_f32"), ["bias_gelu"]);
        assert_eq!(candidate_modules(&specs, "layernorm::whatever"), ["layernorm"]);
        assert_eq!(candidate_modules(&specs, "softmax_rows"), ["misc"]); // unknown: modules without lists
        assert!(candidate_modules(&specs, "nomod::f").is_empty());
        assert_eq!(specs[1].cubins, vec![(80, A)]);
    }

    #[test]
    fn cache_dir_resolution() {
        let d = cache_dir_from(Some("/xdg".into()), Some("/home/u".into()));
        assert_eq!(d, Some(PathBuf::from("/xdg/clipforge/ptx")));
        let d = cache_dir_from(Some("relative".into()), Some("/home/u".into()));
        assert_eq!(d, Some(PathBuf::from("/home/u/.cache/clipforge/ptx")));
        assert_eq!(cache_dir_from(None, Some("/h".into())), Some(PathBuf::from("/h/.cache/clipforge/ptx")));
        assert_eq!(cache_dir_from(Some("".into()), None), None);
    }

    #[test]
    fn cache_key_is_stable_and_sensitive() {
        let k = cache_key("src", 90, (12, 8), &[]);
        assert_eq!(k, cache_key("src", 90, (12, 8), &[]));
        assert_ne!(k, cache_key("src2", 90, (12, 8), &[]));
        assert_ne!(k, cache_key("src", 89, (12, 8), &[]));
        assert_ne!(k, cache_key("src", 90, (12, 9), &[]));
        assert_ne!(k, cache_key("src", 90, (12, 8), &["--use_fast_math".into()]));
        // length prefixes: moving bytes between fields changes the key
        assert_ne!(cache_key("ab", 90, (12, 8), &["c".into()]), cache_key("a", 90, (12, 8), &["bc".into()]));
        // pinned value: the on-disk cache must not change silently between builds
        // (values cross-checked with an independent FNV-1a implementation)
        assert_eq!(cache_key("", 0, (0, 0), &[]), 0xf54b_475a_01e6_46a3);
        assert_eq!(k, 0x0074_7e80_9ece_8ff8);
        assert_eq!(cache_file_name("attn/v2", 90, 0xab), "attn_v2-compute_90-00000000000000ab.ptx");
    }

    #[test]
    fn atomic_write_and_read_back() {
        let dir = std::env::temp_dir().join(format!("cudart-ptx-test-{}", std::process::id()));
        let p = dir.join("nested").join("m-compute_90-1.ptx");
        write_atomic(&p, b"//\n.version 8.5\n.target sm_90\n").unwrap();
        write_atomic(&p, b"//\n.version 8.7\n.target sm_90\n\0").unwrap(); // overwrite
        assert_eq!(read_cached_ptx(&p).as_deref(), Some("//\n.version 8.7\n.target sm_90\n"));
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
        write_atomic(&p, b"garbage").unwrap();
        assert_eq!(read_cached_ptx(&p), None);
        assert_eq!(read_cached_ptx(&dir.join("missing.ptx")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_names() {
        assert_eq!(split_kernel_name("gemm::sgemm_tn"), (Some("gemm"), "sgemm_tn"));
        assert_eq!(split_kernel_name("softmax_rows"), (None, "softmax_rows"));
    }
}
