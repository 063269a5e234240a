//! A trap-and-emulate AMX-BF16 unit for x86-64 Linux CPUs without AMX, so that the AMX GEMM's
//! real instructions (`gemm_amx::HwTiles`: the inline asm as compiled, with the registers and
//! addressing the compiler chose) run here and can be checked against the reference.
//!
//! Each AMX instruction raises #UD (SIGILL) on such a CPU. [`install`] sets a SIGILL handler that
//! decodes the faulting instruction from its bytes ([`decode`]: VEX-encoded, map 0F38), executes it
//! on this thread's tile state with the registers of the signal context, and resumes after it.
//! It implements the six instructions the GEMM uses — `ldtilecfg`, `tilerelease`, `tilezero`,
//! `tileloadd`, `tilestored`, `tdpbf16ps` — with the checks of Intel's SDM that the hardware makes
//! (#UD/#GP): tiles configured before use, a valid palette-1 configuration (reserved bytes zero,
//! rows ≤ 16, colsb ≤ 64, tiles 8–15 unused), `tdpbf16ps` on three distinct tiles of matching
//! shapes, SIB addressing for tile loads and stores. A violation, or any other illegal
//! instruction, prints what and where and ends the process (exit 70), as the hardware would fault.
//!
//! `tdpbf16ps` follows the SDM pseudocode: `C[m][n] += A[m][2k]·B[k][2n]`, then `+= A[m][2k+1]·
//! B[k][2n+1]`, k ascending, one rounding (RNE) per accumulation, bf16 denormal inputs read as
//! zero, f32 denormal results flushed to zero. It is written here from the SDM, apart from the
//! library's software model (`gemm_amx::SoftTiles`), so the two are independent witnesses.
//!
//! What this cannot show: the hardware's own summation order and speed, and Linux's tile-data
//! permission (`arch_prctl`), which a CPU without AMX does not grant.
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The instructions emulated, in the order of [`counts`].
pub const NAMES: [&str; 6] = ["ldtilecfg", "tilerelease", "tilezero", "tileloadd", "tilestored", "tdpbf16ps"];
static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// How many of each instruction ([`NAMES`]) were emulated so far, all threads.
pub fn counts() -> [u64; 6] {
    std::array::from_fn(|i| COUNTS[i].load(Ordering::Relaxed))
}

/// A memory operand: `base + index·scale + disp` (`rip`: disp is relative to the next instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mem {
    pub base: Option<u8>,
    pub index: Option<u8>,
    pub scale: u8,
    pub disp: i64,
    pub rip: bool,
}

/// A decoded AMX instruction (tile numbers 0..8, general registers by their encoding 0..16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    LdTileCfg(Mem),
    TileRelease,
    TileZero(u8),
    /// `tileloadd tmm, [base + disp]` with the row stride `index·scale`.
    TileLoad(u8, Mem),
    TileStore(u8, Mem),
    /// `tdpbf16ps c, a, b`.
    Dp(u8, u8, u8),
}

/// Decodes one instruction at the start of `code`: the instruction and its length.
pub fn decode(code: &[u8]) -> Result<(Insn, usize), String> {
    let byte = |i: usize| code.get(i).copied().ok_or_else(|| "truncated instruction".to_string());
    if byte(0)? != 0xc4 {
        return Err(format!("not a 3-byte VEX instruction (first byte {:#04x})", byte(0)?));
    }
    let (p1, p2, op, modrm) = (byte(1)?, byte(2)?, byte(3)?, byte(4)?);
    let (r, x, b) = ((!p1 >> 7) & 1, (!p1 >> 6) & 1, (!p1 >> 5) & 1);
    let (map, w, vvvv, l, pp) = (p1 & 0x1f, p2 >> 7, (!p2 >> 3) & 0xf, (p2 >> 2) & 1, p2 & 3);
    if map != 2 || w != 0 || l != 0 {
        return Err(format!("VEX map {map}, W{w}, L{l}: not an AMX instruction"));
    }
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7 | r << 3, modrm & 7);
    let tile = |t: u8| if t < 8 { Ok(t) } else { Err(format!("tile register tmm{t} does not exist (#UD)")) };
    let no_vvvv = || if vvvv == 0 { Ok(()) } else { Err(format!("VEX.vvvv = {vvvv} must be unused (#UD)")) };
    // register forms: ModRM.mod = 11
    if md == 3 {
        let rm = rm | b << 3;
        return match (op, pp) {
            (0x49, 0) if reg == 0 && rm == 0 => no_vvvv().map(|_| (Insn::TileRelease, 5)),
            (0x49, 3) if rm == 0 => no_vvvv().and(tile(reg)).map(|t| (Insn::TileZero(t), 5)),
            (0x5c, 2) => Ok((Insn::Dp(tile(reg)?, tile(rm)?, tile(vvvv)?), 5)),
            _ => Err(format!("opcode {op:#04x} pp {pp} ModRM {modrm:#04x}: not emulated")),
        };
    }
    // memory forms
    let mut len = 5;
    let (mut base, mut index, mut scale, mut rip) = (Some(rm | b << 3), None, 1u8, false);
    if rm == 4 {
        let sib = byte(5)?;
        len += 1;
        scale = 1 << (sib >> 6);
        let (idx, bs) = ((sib >> 3) & 7 | x << 3, sib & 7);
        index = (idx != 4).then_some(idx);
        base = if bs == 5 && md == 0 { None } else { Some(bs | b << 3) };
    } else if rm == 5 && md == 0 {
        (base, rip) = (None, true);
    }
    let disp = match md {
        1 => {
            len += 1;
            byte(len - 1)? as i8 as i64
        }
        _ if md == 2 || base.is_none() => {
            let d = (len..len + 4).map(byte).collect::<Result<Vec<u8>, String>>()?;
            len += 4;
            i32::from_le_bytes([d[0], d[1], d[2], d[3]]) as i64
        }
        _ => 0,
    };
    let mem = Mem { base, index, scale, disp, rip };
    match (op, pp) {
        (0x49, 0) if reg == 0 => no_vvvv().map(|_| (Insn::LdTileCfg(mem), len)),
        (0x4b, 3 | 2) => {
            no_vvvv()?;
            if rm != 4 || rip {
                return Err("tile load/store without SIB addressing (#UD)".into());
            }
            let t = tile(reg)?;
            Ok((if pp == 3 { Insn::TileLoad(t, mem) } else { Insn::TileStore(t, mem) }, len))
        }
        _ => Err(format!("opcode {op:#04x} pp {pp} ModRM {modrm:#04x} (memory form): not emulated")),
    }
}

/// One thread's tile unit: the configuration (None: not configured) and 8 tiles of 16 × 64 bytes.
struct Unit {
    cfg: Option<([u8; 8], [u16; 8])>,
    t: [[[u8; 64]; 16]; 8],
}

thread_local! {
    // const-initialised and without a destructor: safe to touch from the signal handler
    static UNIT: UnsafeCell<Unit> = const { UnsafeCell::new(Unit { cfg: None, t: [[[0; 64]; 16]; 8] }) };
}

/// What the hardware would do to the process: #UD or #GP, reported and ended.
fn fault(rip: usize, what: &str) -> ! {
    let msg = format!("amx_trap: at {rip:#x}: {what}\n");
    // SAFETY: write(2) of an owned buffer; _exit ends the process without unwinding.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(70)
    }
}

/// bf16 `i` of a 64-byte tile row as f32; the SDM's DAZ: an input whose exponent field is zero is a
/// zero of its sign.
fn bf16_daz(row: &[u8; 64], i: usize) -> f32 {
    let bits = u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32;
    let (negative, exponent) = (bits >> 15 == 1, (bits >> 7) & 0xff);
    match exponent {
        0 if negative => -0.0,
        0 => 0.0,
        _ => f32::from_bits(bits << 16),
    }
}

/// The SDM's FTZ: a result below the smallest normal in magnitude becomes a zero of its sign.
fn ftz(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        0f32.copysign(x)
    } else {
        x
    }
}

impl Unit {
    /// Runs `insn`; `ea(mem)` is a memory operand's address, `reg(i)` a general register.
    ///
    /// # Safety
    /// The addresses the instruction reads and writes are the program's to access (as for the
    /// hardware: a bad address faults in here).
    unsafe fn exec(&mut self, insn: Insn, ea: impl Fn(Mem) -> usize, reg: impl Fn(u8) -> usize) -> Result<(), String> {
        let shape = |cfg: Option<([u8; 8], [u16; 8])>, t: u8| match cfg {
            Some((rows, colsb)) if rows[t as usize] > 0 => Ok((rows[t as usize] as usize, colsb[t as usize] as usize)),
            Some(_) => Err(format!("tmm{t} is not configured (#UD)")),
            None => Err("tile instruction before ldtilecfg (#UD)".to_string()),
        };
        match insn {
            Insn::LdTileCfg(mem) => {
                // SAFETY: the caller's: 64 bytes at the operand.
                let c = unsafe { std::slice::from_raw_parts(ea(mem) as *const u8, 64) };
                match c[0] {
                    0 => self.cfg = None,
                    1 => {
                        if c[1..16].iter().any(|&x| x != 0) {
                            return Err("ldtilecfg: start_row or reserved bytes 2..16 not zero (#GP)".into());
                        }
                        if c[32..48].iter().chain(&c[56..64]).any(|&x| x != 0) {
                            return Err("ldtilecfg: tiles 8..15 configured in palette 1 (#GP)".into());
                        }
                        let rows: [u8; 8] = std::array::from_fn(|t| c[48 + t]);
                        let colsb: [u16; 8] = std::array::from_fn(|t| u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]));
                        for t in 0..8 {
                            if rows[t] > 16 || colsb[t] > 64 || (rows[t] == 0) != (colsb[t] == 0) {
                                return Err(format!("ldtilecfg: tmm{t} rows {} colsb {} (#GP)", rows[t], colsb[t]));
                            }
                        }
                        self.cfg = Some((rows, colsb));
                    }
                    p => return Err(format!("ldtilecfg: palette {p} (#GP)")),
                }
                self.t = [[[0; 64]; 16]; 8];
            }
            Insn::TileRelease => {
                self.cfg = None;
                self.t = [[[0; 64]; 16]; 8];
            }
            Insn::TileZero(t) => {
                shape(self.cfg, t)?;
                self.t[t as usize] = [[0; 64]; 16];
            }
            Insn::TileLoad(t, mem) | Insn::TileStore(t, mem) => {
                let (rows, colsb) = shape(self.cfg, t)?;
                let stride = mem.index.map_or(0, |i| reg(i).wrapping_mul(mem.scale as usize));
                let start = ea(Mem { index: None, ..mem });
                let tile = &mut self.t[t as usize];
                for (r, row) in tile.iter_mut().enumerate() {
                    let p = start.wrapping_add(r.wrapping_mul(stride));
                    match insn {
                        Insn::TileLoad(..) => {
                            *row = [0; 64];
                            if r < rows {
                                // SAFETY: the caller's: colsb bytes per configured row.
                                row[..colsb].copy_from_slice(unsafe { std::slice::from_raw_parts(p as *const u8, colsb) });
                            }
                        }
                        _ if r < rows => {
                            // SAFETY: as above, written.
                            unsafe { std::slice::from_raw_parts_mut(p as *mut u8, colsb) }.copy_from_slice(&row[..colsb]);
                        }
                        _ => {}
                    }
                }
            }
            Insn::Dp(c, a, b) => {
                if c == a || c == b || a == b {
                    return Err(format!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}: tiles not distinct (#UD)"));
                }
                let ((cr, cc), (ar, ac), (br, bc)) = (shape(self.cfg, c)?, shape(self.cfg, a)?, shape(self.cfg, b)?);
                if cc % 4 != 0 || ac % 4 != 0 || cr != ar || cc != bc || ac / 4 != br {
                    return Err(format!("tdpbf16ps shapes: C {cr}×{cc}B, A {ar}×{ac}B, B {br}×{bc}B (#UD)"));
                }
                let (at, bt) = (self.t[a as usize], self.t[b as usize]);
                let ct = &mut self.t[c as usize];
                for m in 0..cr {
                    for n in 0..cc / 4 {
                        let mut acc = f32::from_le_bytes(ct[m][4 * n..4 * n + 4].try_into().unwrap());
                        for (k, brow) in bt.iter().enumerate().take(ac / 4) {
                            acc = ftz(bf16_daz(&at[m], 2 * k).mul_add(bf16_daz(brow, 2 * n), acc));
                            acc = ftz(bf16_daz(&at[m], 2 * k + 1).mul_add(bf16_daz(brow, 2 * n + 1), acc));
                        }
                        ct[m][4 * n..4 * n + 4].copy_from_slice(&acc.to_le_bytes());
                    }
                    ct[m][cc..].fill(0);
                }
                ct[cr..].iter_mut().for_each(|row| *row = [0; 64]);
            }
        }
        let i = match insn {
            Insn::LdTileCfg(_) => 0,
            Insn::TileRelease => 1,
            Insn::TileZero(_) => 2,
            Insn::TileLoad(..) => 3,
            Insn::TileStore(..) => 4,
            Insn::Dp(..) => 5,
        };
        COUNTS[i].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The signal context's register `enc` (x86 encoding: 0 rax … 15 r15).
fn greg(gregs: &[libc::greg_t; 23], enc: u8) -> usize {
    use libc::*;
    const MAP: [c_int; 16] =
        [REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI, REG_R8, REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15];
    gregs[MAP[enc as usize] as usize] as usize
}

extern "C" fn on_sigill(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted context; the faulting instruction's bytes are
    // code (an instruction is at most 15 bytes; decode reads no more than it needs).
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let gregs = &mut uc.uc_mcontext.gregs;
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let code = unsafe { std::slice::from_raw_parts(rip as *const u8, 15) };
    let (insn, len) = decode(code).unwrap_or_else(|e| fault(rip, &format!("illegal instruction {:02x?}: {e}", &code[..8])));
    let g = *gregs;
    let ea = |m: Mem| {
        let base = match (m.base, m.rip) {
            (Some(b), _) => greg(&g, b),
            (None, true) => rip + len,
            (None, false) => 0,
        };
        base.wrapping_add(m.index.map_or(0, |i| greg(&g, i).wrapping_mul(m.scale as usize))).wrapping_add(m.disp as usize)
    };
    // SAFETY: the addresses are the interrupted program's operands (its contract with the CPU).
    let done = UNIT.with(|u| unsafe { (*u.get()).exec(insn, ea, |r| greg(&g, r)) });
    if let Err(e) = done {
        fault(rip, &format!("{insn:?}: {e}"));
    }
    gregs[libc::REG_RIP as usize] = (rip + len) as libc::greg_t;
}

/// Installs the emulator for the whole process (once; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain sigaction with an SA_SIGINFO handler; the struct is zeroed first.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigill as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGILL, &sa, std::ptr::null_mut()), 0, "sigaction(SIGILL)");
        }
    });
}
