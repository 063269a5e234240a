//! A minimal unpickler for the `data.pkl` of PyTorch checkpoints: it understands the opcodes that
//! `torch.save` (state dicts) and `torch.jit.save` (TorchScript module trees) write, and builds an
//! inert value tree. Nothing is ever executed: a GLOBAL resolves only to a short whitelist (an
//! `OrderedDict`, the tensor rebuilders, the storage types, and, in a TorchScript archive, the
//! `__torch__.` module classes, which become opaque objects whose BUILD state is kept); any other
//! global or opcode is an error naming it and its byte offset.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A whitelisted global the pickle may name.
#[derive(Clone, Debug, PartialEq)]
pub enum Global {
    /// `collections.OrderedDict` (called with no arguments: an empty dict).
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` (a Parameter around a tensor).
    RebuildParameter,
    /// `torch.<Kind>Storage`: the element type of a storage.
    Storage(StorageDtype),
    /// A TorchScript class (`__torch__.…`), only as an object constructor.
    TorchClass(String),
}

/// The element types of PyTorch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn from_name(n: &str) -> Option<StorageDtype> {
        use StorageDtype::*;
        Some(match n {
            "FloatStorage" => F32,
            "HalfStorage" => F16,
            "BFloat16Storage" => BF16,
            "DoubleStorage" => F64,
            "LongStorage" => I64,
            "IntStorage" => I32,
            "ShortStorage" => I16,
            "CharStorage" => I8,
            "ByteStorage" => U8,
            "BoolStorage" => Bool,
            _ => return None,
        })
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        use StorageDtype::*;
        match self {
            F64 | I64 => 8,
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 | U8 | Bool => 1,
        }
    }
}

/// A storage named by a persistent id: its type, its key (the entry `data/<key>`) and length.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub dtype: StorageDtype,
    pub key: String,
    pub numel: usize,
}

/// A tensor as the pickle describes it: a view of a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// A TorchScript object: its class name and the state its BUILD gave it.
#[derive(Debug)]
pub struct Object {
    pub class: String,
    pub state: Option<Value>,
}

/// A value of the pickle. Containers are shared (a memo entry and the stack see one container).
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
    Object(Rc<RefCell<Object>>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object(_) => "object",
        }
    }
}

/// Why a pickle was refused: the message (without the file name).
pub type PickleError = String;

enum Item {
    Mark,
    V(Value),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| format!("pickle ends early (at byte {} of {})", self.pos, self.b.len()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, n: usize) -> Result<String, PickleError> {
        let at = self.pos;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("string at byte {at} is not UTF-8"))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.b[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or_else(|| format!("unterminated GLOBAL name at byte {}", self.pos))?;
        let s = self.str(n)?;
        self.pos += 1;
        Ok(s)
    }
}

/// Drops `v` without recursion: a pickle can nest containers a million deep in a few
/// megabytes, and the compiler's recursive drop of that overflows the stack (an abort, found by
/// tests/hostile.rs). Containers shared with another owner are left to it.
pub fn dismantle(v: Value) {
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v {
            Value::Tuple(rc) => todo.extend(Rc::try_unwrap(rc).unwrap_or_default()),
            Value::List(rc) => todo.extend(Rc::try_unwrap(rc).map(RefCell::into_inner).unwrap_or_default()),
            Value::Dict(rc) => todo.extend(Rc::try_unwrap(rc).map(RefCell::into_inner).unwrap_or_default().into_iter().flat_map(|(k, x)| [k, x])),
            Value::Object(rc) => todo.extend(Rc::try_unwrap(rc).ok().and_then(|o| o.into_inner().state)),
            _ => {}
        }
    }
}

/// Unpickles `bytes`; `torchscript` allows the `__torch__.` classes of a TorchScript archive.
/// A deeply nested result is best given to [`dismantle`] rather than dropped.
pub fn unpickle(bytes: &[u8], torchscript: bool) -> Result<Value, PickleError> {
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let r = unpickle_with(bytes, torchscript, &mut stack, &mut memo);
    // what is left on the stack and in the memo (after an error, or shared with the result)
    stack.into_iter().filter_map(|i| if let Item::V(v) = i { Some(v) } else { None }).chain(memo.into_values()).for_each(dismantle);
    r
}

fn unpickle_with(bytes: &[u8], torchscript: bool, stack: &mut Vec<Item>, memo: &mut HashMap<u32, Value>) -> Result<Value, PickleError> {
    let mut r = Reader { b: bytes, pos: 0 };
    loop {
        let at = r.pos;
        let op = r.u8()?;
        let pop = |stack: &mut Vec<Item>| -> Result<Value, PickleError> {
            match stack.pop() {
                Some(Item::V(v)) => Ok(v),
                _ => Err(format!("malformed pickle: empty stack or MARK where a value is needed at byte {at}")),
            }
        };
        let pop_mark = |stack: &mut Vec<Item>| -> Result<Vec<Value>, PickleError> {
            let m = stack.iter().rposition(|i| matches!(i, Item::Mark)).ok_or_else(|| format!("malformed pickle: no MARK at byte {at}"))?;
            let items = stack.split_off(m + 1);
            stack.pop();
            Ok(items.into_iter().filter_map(|i| if let Item::V(v) = i { Some(v) } else { None }).collect())
        };
        match op {
            0x80 => {
                r.u8()?; // PROTO n
            }
            0x95 => {
                r.u64()?; // FRAME size (protocol 4)
            }
            b'.' => return pop(stack), // STOP
            b'(' => stack.push(Item::Mark),
            b'}' => stack.push(Item::V(Value::Dict(Rc::new(RefCell::new(vec![]))))),
            b']' => stack.push(Item::V(Value::List(Rc::new(RefCell::new(vec![]))))),
            b')' => stack.push(Item::V(Value::Tuple(Rc::new(vec![])))),
            b'N' => stack.push(Item::V(Value::None)),
            0x88 => stack.push(Item::V(Value::Bool(true))),
            0x89 => stack.push(Item::V(Value::Bool(false))),
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Item::V(Value::Str(r.str(n)?)));
            }
            0x8d => {
                let n = usize::try_from(r.u64()?).map_err(|_| format!("string length too large at byte {at}"))?;
                stack.push(Item::V(Value::Str(r.str(n)?)));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Item::V(Value::Str(r.str(n)?)));
            }
            b'J' => stack.push(Item::V(Value::Int(r.u32()? as i32 as i64))),
            b'K' => stack.push(Item::V(Value::Int(r.u8()? as i64))),
            b'M' => stack.push(Item::V(Value::Int(r.u16()? as i64))),
            0x8a => {
                let n = r.u8()? as usize;
                if n > 8 {
                    return Err(format!("integer of {n} bytes at byte {at} is too large"));
                }
                let s = r.take(n)?;
                let mut a = [if s.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 }; 8];
                a[..n].copy_from_slice(s);
                stack.push(Item::V(Value::Int(i64::from_le_bytes(a))));
            }
            b'G' => {
                let s = r.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                stack.push(Item::V(Value::Float(f64::from_be_bytes(a))));
            }
            b't' => {
                let items = pop_mark(stack)?;
                stack.push(Item::V(Value::Tuple(Rc::new(items))));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = (0..n).map(|_| pop(stack)).collect::<Result<Vec<_>, _>>()?;
                items.reverse();
                stack.push(Item::V(Value::Tuple(Rc::new(items))));
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(stack)?;
                    vec![pop(stack)?, v]
                } else {
                    pop_mark(stack)?
                };
                match stack.last() {
                    Some(Item::V(Value::Dict(d))) if items.len() % 2 == 0 => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.borrow_mut().push((k, v));
                        }
                    }
                    _ => return Err(format!("malformed pickle: SETITEM(S) without a dict at byte {at}")),
                }
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![pop(stack)?] } else { pop_mark(stack)? };
                match stack.last() {
                    Some(Item::V(Value::List(l))) => l.borrow_mut().extend(items),
                    _ => return Err(format!("malformed pickle: APPEND(S) without a list at byte {at}")),
                }
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                match stack.last() {
                    Some(Item::V(v)) => {
                        memo.insert(key, v.clone());
                    }
                    _ => return Err(format!("malformed pickle: memo put of nothing at byte {at}")),
                }
            }
            b'h' | b'j' => {
                let key = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo.get(&key).ok_or_else(|| format!("malformed pickle: memo {key} read before written at byte {at}"))?;
                stack.push(Item::V(v.clone()));
            }
            b'c' | 0x93 => {
                let (module, name) = if op == b'c' {
                    (r.line()?, r.line()?)
                } else {
                    let name = pop(stack)?;
                    let module = pop(stack)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => (m, n),
                        _ => return Err(format!("malformed pickle: STACK_GLOBAL without two strings at byte {at}")),
                    }
                };
                stack.push(Item::V(Value::Global(
                    resolve(&module, &name, torchscript).ok_or_else(|| format!("unsupported pickle global {module}.{name} at byte {at}"))?,
                )));
            }
            b'Q' => {
                let pid = pop(stack)?;
                stack.push(Item::V(Value::Storage(
                    persistent(&pid).ok_or_else(|| format!("unsupported persistent id at byte {at} (expected ('storage', type, key, location, numel))"))?,
                )));
            }
            b'R' => {
                let args = pop(stack)?;
                let f = pop(stack)?;
                let args = match args {
                    Value::Tuple(t) => t,
                    a => return Err(format!("malformed pickle: REDUCE with {} arguments at byte {at}", a.kind())),
                };
                stack.push(Item::V(reduce(&f, &args).map_err(|e| format!("{e} at byte {at}"))?));
            }
            0x81 => {
                let _args = pop(stack)?;
                match pop(stack)? {
                    Value::Global(Global::TorchClass(class)) => stack.push(Item::V(Value::Object(Rc::new(RefCell::new(Object { class, state: None }))))),
                    v => return Err(format!("unsupported NEWOBJ of a {} at byte {at}", v.kind())),
                }
            }
            b'b' => {
                let state = pop(stack)?;
                match stack.last() {
                    Some(Item::V(Value::Object(o))) => o.borrow_mut().state = Some(state),
                    Some(Item::V(Value::Tensor(_))) => {} // a Parameter's extra state: not needed
                    _ => return Err(format!("unsupported BUILD (not of a TorchScript object) at byte {at}")),
                }
            }
            _ => return Err(format!("unsupported pickle opcode 0x{op:02x} ({}) at byte {at}", opcode_name(op))),
        }
    }
}

/// The whitelist of globals.
fn resolve(module: &str, name: &str, torchscript: bool) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", n) => StorageDtype::from_name(n).map(Global::Storage),
        (m, n) if torchscript && (m == "__torch__" || m.starts_with("__torch__.")) => Some(Global::TorchClass(format!("{m}.{n}"))),
        _ => None,
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(as_usize).collect(),
        _ => None,
    }
}

/// ('storage', torch.XStorage, key, location, numel) → the storage it names.
fn persistent(pid: &Value) -> Option<StorageRef> {
    let Value::Tuple(t) = pid else { return None };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), numel] if tag == "storage" => {
            Some(StorageRef { dtype: *dtype, key: key.clone(), numel: as_usize(numel)? })
        }
        _ => None,
    }
}

fn reduce(f: &Value, args: &[Value]) -> Result<Value, PickleError> {
    match f {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Rc::new(RefCell::new(vec![])))),
        Value::Global(Global::RebuildTensor) => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            let (Some(Value::Storage(s)), Some(offset), Some(shape), Some(strides)) =
                (args.first(), args.get(1).and_then(as_usize), args.get(2).and_then(usizes), args.get(3).and_then(usizes))
            else {
                return Err("malformed _rebuild_tensor_v2 arguments".into());
            };
            if shape.len() != strides.len() {
                return Err(format!("tensor of shape {shape:?} with {} strides", strides.len()));
            }
            Ok(Value::Tensor(Rc::new(TensorRef { storage: s.clone(), offset, shape, strides })))
        }
        Value::Global(Global::RebuildParameter) => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err("malformed _rebuild_parameter arguments".into()),
        },
        v => Err(format!("unsupported call of a {} {}", v.kind(), if let Value::Global(g) = v { format!("{g:?}") } else { String::new() })),
    }
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'B' | b'C' | 0x8e => "BINBYTES",
        b'i' => "INST",
        b'o' => "OBJ",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'l' => "LIST",
        b'd' => "DICT",
        b'p' => "PUT",
        b'g' => "GET",
        b'P' => "PERSID",
        0x82..=0x84 => "EXT",
        0x8b => "LONG4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x96..=0x98 => "BYTEARRAY/BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
#[path = "pickle_tests.rs"]
mod tests;
