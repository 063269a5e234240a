//! Token ids identical to HF's CLIPTokenizerFast for the fixture corpus (unicode, emoji,
//! contractions, numbers, whitespace runs, texts longer than 77 and 248 tokens), truncated to
//! 77 and to 248 (start token, first n−2 tokens, end token).
use clipforge::io::tokenizer::ClipTokenizer;
use std::path::Path;

#[test]
fn ids_match_hf_at_77_and_248() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("tokens.json")).unwrap()).unwrap();
    let texts = v["texts"].as_array().unwrap();
    assert!(texts.len() >= 200);
    for (ctx, key) in [(77, "ids_77"), (248, "ids_248")] {
        let tok = ClipTokenizer::from_file(&root.join("tokenizer.json"), ctx).unwrap();
        let mut truncated = 0;
        for (i, t) in texts.iter().enumerate() {
            let want: Vec<u32> = v[key][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let got = tok.encode(t.as_str().unwrap()).unwrap();
            assert_eq!(got, want, "text {i} {:?} at context {ctx}", t.as_str().unwrap());
            truncated += (want.len() == ctx) as usize;
        }
        assert!(truncated >= 5, "corpus must exercise truncation at {ctx}");
    }
}

#[test]
fn context_too_short_is_an_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    assert!(ClipTokenizer::from_file(&root.join("tokenizer.json"), 1).is_err());
    assert!(ClipTokenizer::from_file(&root.join("nonexistent.json"), 77).is_err());
}
