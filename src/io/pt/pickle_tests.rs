//! Unit tests of `pickle.rs` (a file of their own to keep it short).
use super::*;

#[test]
fn refuses_a_foreign_global() {
    // pickle.dumps of os.system, protocol 2
    let p = b"\x80\x02cposix\nsystem\nq\x00.";
    let e = unpickle(p, false).unwrap_err();
    assert!(e.contains("posix.system") && e.contains("byte 2"), "{e}");
}

#[test]
fn reads_a_small_dict() {
    // pickle.dumps({'a': [1, 2.5, True], 'b': None}, protocol=2)
    let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00\x88eX\x01\x00\x00\x00bq\x03Nu.";
    let Value::Dict(d) = unpickle(p, false).unwrap() else { panic!() };
    let d = d.borrow();
    assert_eq!(d.len(), 2);
    let Value::List(l) = &d[0].1 else { panic!() };
    assert!(matches!(l.borrow()[1], Value::Float(x) if x == 2.5));
}

#[test]
fn never_panics_on_cut_or_altered_bytes() {
    let p: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00\x88eX\x01\x00\x00\x00bq\x03ctorch._utils\n_rebuild_tensor_v2\nq\x04(Nh\x01\x8a\x02\xff\x7f)\x89tRu.";
    for n in 0..p.len() {
        let _ = unpickle(&p[..n], true);
        for b in [0u8, 0x28, 0x2e, 0x71, 0x68, 0x8a, 0xff] {
            let mut q = p.to_vec();
            q[n] = b;
            let _ = unpickle(&q, true);
        }
    }
}

#[test]
fn torchscript_classes_only_in_torchscript() {
    let p = b"\x80\x02c__torch__.m\nC\nq\x00)\x81}b.";
    assert!(unpickle(p, false).is_err());
    assert!(matches!(unpickle(p, true).unwrap(), Value::Object(_)));
}
