//! NCCL communicators: gradient buckets summed on the GPUs (`ncclAllReduce`, f32, sum), the
//! unique id made by rank 0 and carried to the others by the [`TcpGroup`], which also carries
//! the small host collectives (loss terms, barriers) and a rank's failure; the embeddings'
//! all-gather and their gradients' reduce-scatter go through NCCL (`ncclAllGather`,
//! `ncclReduceScatter`) from host memory via device buffers.
//!
//! The library is loaded at run time, never linked: `$CLIPFORGE_NCCL` (a path) if set, else
//! `libnccl.so.2` (the name NCCL's runtime packages and the `nvidia-nccl-cu*` wheels install),
//! else `libnccl.so`, found on the loader's path (`LD_LIBRARY_PATH`). The types of the calls are
//! cudarc's bindings (`cudarc::nccl::sys`); the symbols are looked up here rather than through
//! cudarc's loader because that one only tries `libnccl.so` and versioned names NCCL does not
//! use, and panics when a library or symbol is missing. Every symbol used is checked when the
//! library is loaded, so no NCCL, or one too old, is a one-line error ([`available`]).
//!
//! Ordering: by default the all-reduces are enqueued on the device's compute stream
//! ([`DeviceOps::cuda_stream`]), in order after the backward kernels that produced the bucket
//! and before the optimizer's; the host does not wait for them, but the rest of the backward
//! waits for each reduction. With [`NcclCollective::set_overlap`] they go on a stream of their
//! own instead (it waits for the compute stream's work so far, an event), so a bucket's
//! reduction runs while the backward goes on; the caller then calls
//! [`NcclCollective::wait_device`] before the optimizer reads the gradients, and keeps the
//! bucket's buffers alive until then. The sum's order is NCCL's (ring or tree): the same bits
//! on every rank, but not the rank-ordered host sum.
//!
//! Failure: [`Collective::abort`] aborts the communicator (`ncclCommAbort`) and tells the other
//! ranks through the TCP group. A rank that dies while the others are inside an NCCL kernel is
//! noticed by NCCL's own transport (network) or not at all (NVLink peers wait); the launcher
//! ([`super::launch::spawn_local`]) then stops every rank.
use super::launch::RankEnv;
use super::tcp::TcpGroup;
use super::Collective;
use crate::cuda::{Buf, DeviceOps};
use crate::error::{Error, Result};
use cudarc::driver::CudaStream;
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, OnceLock};

/// The NCCL entry points used here (ncclResult_t read as a plain int: a code this build does
/// not know must not be undefined behaviour).
struct Lib {
    path: String,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> c_int,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the loader.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated (above); copied before the next loader call.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Looks `name` up in `h` as a function of type `F`.
///
/// # Safety
/// `h` is a live dlopen handle and `F` is the C signature of `name`.
unsafe fn sym<F: Copy>(h: *mut c_void, path: &str, name: &str) -> std::result::Result<F, String> {
    let c = CString::new(name).map_err(|_| format!("bad symbol name {name}"))?;
    let p = libc::dlsym(h, c.as_ptr());
    if p.is_null() {
        return Err(format!("{path} has no {name}: NCCL 2.7 or newer is needed"));
    }
    // SAFETY: p is the address of `name`, whose C signature the caller gives as F (a fn pointer).
    Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
}

fn load() -> std::result::Result<Lib, String> {
    let mut names: Vec<String> = vec![];
    if let Ok(p) = std::env::var("CLIPFORGE_NCCL") {
        names.push(p);
    }
    names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
    load_from(&names)
}

/// The first of `names` that loads, with every symbol; a library that loads but lacks one is
/// the error (not the next name: it is the NCCL the user pointed at).
fn load_from(names: &[String]) -> std::result::Result<Lib, String> {
    let mut tried = vec![];
    for name in names {
        let Ok(c) = CString::new(name.as_str()) else { continue };
        // SAFETY: a valid NUL-terminated name; the handle is kept for the life of the process
        // (the function pointers below point into it).
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            tried.push(format!("{name}: {}", dlerror()));
            continue;
        }
        // SAFETY: h is live; each type is the symbol's C signature in nccl.h (2.7+).
        let lib = unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym(h, name, "ncclGetVersion")?;
            let mut version = 0;
            get_version(&mut version);
            Lib {
                path: name.clone(),
                version,
                get_unique_id: sym(h, name, "ncclGetUniqueId")?,
                comm_init_rank: sym(h, name, "ncclCommInitRank")?,
                all_reduce: sym(h, name, "ncclAllReduce")?,
                all_gather: sym(h, name, "ncclAllGather")?,
                reduce_scatter: sym(h, name, "ncclReduceScatter")?,
                group_start: sym(h, name, "ncclGroupStart")?,
                group_end: sym(h, name, "ncclGroupEnd")?,
                comm_abort: sym(h, name, "ncclCommAbort")?,
                comm_destroy: sym(h, name, "ncclCommDestroy")?,
                error_string: sym(h, name, "ncclGetErrorString")?,
            }
        };
        return Ok(lib);
    }
    Err(format!(
        "NCCL not found ({}): install it (e.g. pip install nvidia-nccl-cu12) and put the directory of libnccl.so.2 on LD_LIBRARY_PATH, or set CLIPFORGE_NCCL=/path/to/libnccl.so.2",
        tried.join("; ")
    ))
}

fn lib() -> Result<&'static Lib> {
    LIB.get_or_init(load).as_ref().map_err(Error::device)
}

/// Ok when libnccl can be loaded and has every function used here; else why not (one line).
pub fn available() -> Result<()> {
    lib().map(|_| ())
}

/// "2.21.5 (libnccl.so.2)", or why NCCL cannot be used.
pub fn version() -> Result<String> {
    let l = lib()?;
    let v = l.version;
    // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before
    let (major, minor, patch) = if v >= 10000 { (v / 10000, v / 100 % 100, v % 100) } else { (v / 1000, v / 100 % 10, v % 100) };
    Ok(format!("{major}.{minor}.{patch} ({})", l.path))
}

/// `what` failed with NCCL code `code`, as one line.
fn check(l: &Lib, what: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let s = unsafe { (l.error_string)(code) };
    let text = if s.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned() };
    Err(Error::device(format!("{what}: NCCL error {code}: {text}")))
}

/// Data-parallel collectives with NCCL on the GPUs and the TCP group on the side.
pub struct NcclCollective {
    /// Null once aborted.
    comm: AtomicPtr<cudarc::nccl::sys::ncclComm>,
    stream: Arc<CudaStream>,
    /// The stream of the overlapped reductions ([`NcclCollective::set_overlap`]).
    comm_stream: Option<Arc<CudaStream>>,
    group: TcpGroup,
    ordinal: String,
}

impl NcclCollective {
    /// The communicator of `env.rank` on the GPU `ops` drives: rank 0 makes the unique id, the
    /// group carries it to the others, every rank joins (`ncclCommInitRank`, which waits for all).
    /// Any failure is also sent to the other ranks through `group`, so none waits for this one.
    pub fn new(env: &RankEnv, ops: &dyn DeviceOps, group: TcpGroup) -> Result<NcclCollective> {
        match Self::init(env, ops, &group) {
            Ok((comm, stream)) => Ok(NcclCollective { comm: AtomicPtr::new(comm), stream, comm_stream: None, ordinal: ops.describe(), group }),
            Err(e) => {
                group.abort(&format!("NCCL setup: {}", e.message()));
                Err(e)
            }
        }
    }

    fn init(env: &RankEnv, ops: &dyn DeviceOps, group: &TcpGroup) -> Result<(ncclComm_t, Arc<CudaStream>)> {
        if group.rank() != env.rank || group.world() != env.world {
            return Err(Error::msg(format!(
                "NCCL setup: the TCP group is rank {} of {}, the environment says rank {} of {}",
                group.rank(),
                group.world(),
                env.rank,
                env.world
            )));
        }
        let stream =
            ops.cuda_stream().ok_or_else(|| Error::device(format!("NCCL needs a CUDA device; {} is not one (use the TCP collective)", ops.describe())))?;
        let l = lib()?;
        let id_bytes = if env.rank == 0 {
            let mut id = ncclUniqueId { internal: [0; 128] };
            // SAFETY: `id` is a valid ncclUniqueId to write.
            check(l, "ncclGetUniqueId", unsafe { (l.get_unique_id)(&mut id) })?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            group.broadcast_bytes(Some(&bytes))?
        } else {
            group.broadcast_bytes(None)?
        };
        if id_bytes.len() != 128 {
            return Err(Error::msg(format!("NCCL setup: rank 0 sent a unique id of {} bytes, not 128", id_bytes.len())));
        }
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as c_char;
        }
        crate::cuda::device::guarded("binding the CUDA context", || stream.context().bind_to_thread())?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let (world, rank) = (c_int::try_from(env.world), c_int::try_from(env.rank));
        let (Ok(world), Ok(rank)) = (world, rank) else { return Err(Error::msg("NCCL setup: world size out of range")) };
        // SAFETY: `comm` receives the communicator; the id came from ncclGetUniqueId on rank 0.
        check(l, &format!("ncclCommInitRank (rank {} of {})", env.rank, env.world), unsafe { (l.comm_init_rank)(&mut comm, world, id, rank) })?;
        Ok((comm, stream))
    }

    /// The TCP group alongside (host collectives, failures).
    pub fn group(&self) -> &TcpGroup {
        &self.group
    }

    /// Device all-reduces on a stream of their own (true), overlapping the compute stream's
    /// later work, or in order on the compute stream (false, the default). See the module docs.
    pub fn set_overlap(&mut self, on: bool) -> Result<()> {
        self.comm_stream = match (on, self.comm_stream.take()) {
            (false, _) => None,
            (true, Some(s)) => Some(s),
            (true, None) => Some(crate::cuda::device::guarded("creating the NCCL stream", || self.stream.context().new_stream())?),
        };
        Ok(())
    }

    /// `send` uploaded, `op(lib, send, recv, comm, stream)` on the compute stream into a device
    /// buffer of `recv_len` f32, downloaded (the host waits). These collectives come between the
    /// forward and the towers' backward, never while a bucket's all-reduce is in flight, so every
    /// rank issues them in the same order as the buckets'.
    fn on_device(
        &self,
        send: &[f32],
        recv_len: usize,
        op: impl FnOnce(&Lib, *const c_void, *mut c_void, ncclComm_t, cudaStream_t) -> c_int,
    ) -> Result<Vec<f32>> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let l = lib()?;
        let comm = self.comm.load(Ordering::SeqCst);
        if comm.is_null() {
            return Err(self.group.failure().map(Error::msg).unwrap_or_else(|| Error::device("the NCCL communicator was aborted")));
        }
        let st = &self.stream;
        crate::cuda::device::guarded("binding the CUDA context", || st.context().bind_to_thread())?;
        let sbuf = crate::cuda::device::guarded("uploading for NCCL", || st.clone_htod(send))?;
        let mut rbuf = crate::cuda::device::guarded("allocating for NCCL", || st.alloc_zeros::<f32>(recv_len.max(1)))?;
        {
            let (sp, _s) = sbuf.device_ptr(st);
            let (rp, _r) = rbuf.device_ptr_mut(st);
            check(l, "an NCCL collective of the embeddings", op(l, sp as *const c_void, rp as *mut c_void, comm, st.cu_stream() as cudaStream_t))?;
        }
        let mut out = crate::cuda::device::guarded("downloading from NCCL", || st.clone_dtoh(&rbuf))?;
        out.truncate(recv_len);
        Ok(out)
    }

    /// Makes the compute stream's later work wait for every reduction enqueued so far (an event;
    /// the host does not block). Needed only with [`NcclCollective::set_overlap`].
    pub fn wait_device(&self) -> Result<()> {
        match &self.comm_stream {
            Some(c) => crate::cuda::device::guarded("waiting for the NCCL stream", || self.stream.join(c)),
            None => Ok(()),
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.group.rank()
    }
    fn world(&self) -> usize {
        self.group.world()
    }
    /// Over NVLink / the network (the embeddings: [b, D] per rank), not through rank 0's sockets.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let world = self.world();
        self.on_device(local, local.len() * world, |l, send, recv, comm, s| unsafe {
            // SAFETY: send holds `local.len()` f32, recv world times that, both on this device.
            (l.all_gather)(send, recv, local.len(), ncclDataType_t::ncclFloat32, comm, s)
        })
    }
    /// The embeddings' gradients: each rank's rows summed over the ranks, on the device.
    fn reduce_scatter(&self, data: &[f32]) -> Result<Vec<f32>> {
        let c = data.len() / self.world().max(1);
        self.on_device(data, c, |l, send, recv, comm, s| unsafe {
            // SAFETY: send holds world·c f32, recv c, both on this device.
            (l.reduce_scatter)(send, recv, c, ncclDataType_t::ncclFloat32, ncclRedOp_t::ncclSum, comm, s)
        })
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.group.all_reduce_sum(data)
    }
    /// Every buffer summed in place over the ranks, one NCCL group, on the compute stream (or
    /// the overlap stream).
    fn all_reduce_device(&self, _ops: &dyn DeviceOps, bufs: &mut [&mut Buf]) -> Result<()> {
        let l = lib()?;
        let comm = self.comm.load(Ordering::SeqCst);
        if comm.is_null() {
            return Err(self.group.failure().map(Error::msg).unwrap_or_else(|| Error::device("the NCCL communicator was aborted")));
        }
        crate::cuda::device::guarded("binding the CUDA context", || self.stream.context().bind_to_thread())?;
        let on = match &self.comm_stream {
            Some(c) => {
                // the bucket's gradients are final once the compute stream's work so far is done
                crate::cuda::device::guarded("ordering the NCCL stream", || c.join(&self.stream))?;
                c
            }
            None => &self.stream,
        };
        let s = on.cu_stream() as cudaStream_t;
        // SAFETY: plain calls; NCCL keeps the group's state per thread.
        check(l, "ncclGroupStart", unsafe { (l.group_start)() })?;
        let mut first_err = Ok(());
        for b in bufs.iter_mut() {
            b.clear_half(); // the values change in place: a 16-bit copy next to them goes stale
            if b.is_empty() || first_err.is_err() {
                continue;
            }
            let p = b.ptr() as *mut c_void;
            // SAFETY: `b` is a live device buffer of `len` f32 on this device; in place (send ==
            // recv) is allowed; the stream orders it after the kernels that wrote `b`.
            first_err = check(l, "ncclAllReduce", unsafe { (l.all_reduce)(p, p, b.len(), ncclDataType_t::ncclFloat32, ncclRedOp_t::ncclSum, comm, s) });
        }
        // SAFETY: closes the group opened above (also after an error, as NCCL requires).
        let end = check(l, "ncclGroupEnd", unsafe { (l.group_end)() });
        first_err.and(end)
    }
    fn device_fence(&self) -> Result<()> {
        self.wait_device()
    }
    fn barrier(&self) -> Result<()> {
        self.group.barrier()
    }
    fn abort(&self, why: &str) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if let (false, Ok(l)) = (comm.is_null(), lib()) {
            // SAFETY: the communicator is live and taken out, so it is aborted once.
            unsafe { (l.comm_abort)(comm) };
        }
        self.group.abort(why);
    }
    fn describe(&self) -> String {
        let v = version().unwrap_or_default();
        format!("nccl {v} on {}, rank {} of {} (host collectives: {})", self.ordinal, self.rank(), self.world(), self.group.describe())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if let (false, Ok(l)) = (comm.is_null(), lib()) {
            // SAFETY: the communicator is live and owned here; after a failure destroy could wait
            // on peers that are gone, so it is aborted instead.
            unsafe {
                if self.group.failure().is_some() {
                    (l.comm_abort)(comm);
                } else {
                    (l.comm_destroy)(comm);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_or_symbols_are_errors() {
        let e = load_from(&["/nonexistent/libnccl.so.2".into()]).err().unwrap();
        assert!(e.starts_with("NCCL not found (/nonexistent/libnccl.so.2: "), "{e}");
        // a library that loads but is not NCCL: a missing symbol, named
        let e = load_from(&["libm.so.6".into()]).err().unwrap();
        assert_eq!(e, "libm.so.6 has no ncclGetVersion: NCCL 2.7 or newer is needed");
    }
}
