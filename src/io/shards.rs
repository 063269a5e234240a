//! Shard lists as WebDataset and img2dataset write them: brace patterns such as
//! `data/{00000..00099}.tar` (a numeric range, zero-padded to the width of its bounds) or
//! `data/{train,val}-{0..3}.tar` (a comma list), several groups per pattern (expanded left to
//! right, the last group varying fastest), several patterns per list (`::`-separated, as
//! WebDataset writes them, or given one by one). No nesting; `{` `}` without a range or a comma
//! are an error rather than a silent literal.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The most names one pattern may expand to (a typo like `{0..99999999}` is an error, not an
/// out-of-memory).
const MAX_EXPANSION: usize = 10_000_000;

/// Expands the brace groups of one pattern, in order.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let bad = |why: String| Error::msg(format!("shard pattern {pattern:?}: {why}"));
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(bad("a '}' without its '{'".into()));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|c| open + c).ok_or_else(|| bad("a '{' without its '}'".into()))?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err(bad("nested braces are not supported".into()));
    }
    let choices = group(body).map_err(bad)?;
    let (head, rest) = (&pattern[..open], &pattern[close + 1..]);
    let tails = expand_braces(rest).map_err(|e| bad(e.to_string()))?;
    if choices.len().saturating_mul(tails.len()) > MAX_EXPANSION {
        return Err(bad(format!("expands to more than {MAX_EXPANSION} names")));
    }
    let mut out = Vec::with_capacity(choices.len() * tails.len());
    for c in &choices {
        for t in &tails {
            out.push(format!("{head}{c}{t}"));
        }
    }
    Ok(out)
}

/// The choices of one `{...}` body: `A..B` (integers; zero-padded to the wider bound when either
/// bound has a leading zero, as `{00000..00099}`; descending when A > B) or `a,b,c`.
fn group(body: &str) -> std::result::Result<Vec<String>, String> {
    if let Some((a, b)) = body.split_once("..") {
        let num = |s: &str| s.parse::<u64>().map_err(|_| format!("{{{body}}}: {s:?} is not a non-negative integer"));
        let (lo, hi) = (num(a)?, num(b)?);
        let width = if (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0')) { a.len().max(b.len()) } else { 0 };
        let n = lo.abs_diff(hi) + 1;
        if n > MAX_EXPANSION as u64 {
            return Err(format!("{{{body}}} expands to more than {MAX_EXPANSION} names"));
        }
        let it: Box<dyn Iterator<Item = u64>> = if lo <= hi { Box::new(lo..=hi) } else { Box::new((hi..=lo).rev()) };
        return Ok(it.map(|i| format!("{i:0width$}")).collect());
    }
    if body.contains(',') {
        return Ok(body.split(',').map(String::from).collect());
    }
    Err(format!("{{{body}}} is neither a range A..B nor a list a,b"))
}

/// Whether a `--data` argument names tar shards rather than a JSONL/JSON file: it ends in `.tar`
/// (after its brace groups), holds a brace group, or is a `::`-separated list.
pub fn is_shard_spec(s: &str) -> bool {
    s.contains("::") || s.split("::").any(|p| p.ends_with(".tar") || (p.contains('{') && p.contains('}')))
}

/// The shards of one or more patterns (each may hold `::`-separated patterns), in order; every
/// shard must be an existing file, and no shard may appear twice.
pub fn shard_list<S: AsRef<str>>(patterns: &[S]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = vec![];
    let mut seen = std::collections::HashSet::new();
    for p in patterns {
        for one in p.as_ref().split("::").filter(|s| !s.is_empty()) {
            for name in expand_braces(one)? {
                let path = PathBuf::from(&name);
                if !path.is_file() {
                    let why = if path.exists() { "is not a file" } else { "does not exist" };
                    return Err(Error::file(&path, format!("shard {why} (from the pattern {one:?})")));
                }
                if !seen.insert(path.clone()) {
                    return Err(Error::file(&path, format!("shard listed twice (from the pattern {one:?})")));
                }
                out.push(path);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::msg("no shards given"));
    }
    Ok(out)
}

/// The shards rank `rank` of `world` works on: shard i goes to rank i % world.
pub fn rank_shards(shards: &[PathBuf], rank: usize, world: usize) -> Result<Vec<PathBuf>> {
    if world == 0 || rank >= world {
        return Err(Error::msg(format!("--shard-rank {rank} --shard-world {world}: need 0 <= rank < world")));
    }
    Ok(shards.iter().enumerate().filter(|(i, _)| i % world == rank).map(|(_, p)| p.clone()).collect())
}

/// A shard's name for its outputs: the file name without `.tar` (`data/00012.tar` → `00012`).
pub fn shard_stem(shard: &Path) -> String {
    let name = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| shard.display().to_string());
    name.strip_suffix(".tar").map(String::from).unwrap_or(name)
}
