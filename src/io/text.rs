//! Text files read as UTF-8 with an error that says where: a file that is not UTF-8 is one line
//! naming the file, the line and the column of the first bad byte (std's own error says only
//! "stream did not contain valid UTF-8").
use crate::error::{Error, Result};
use std::path::Path;

/// Reads `path` as UTF-8 text.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    utf8(path, bytes)
}

/// `bytes` read from `path` as UTF-8 text, or an error naming the line of the first bad byte.
pub fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let b = e.as_bytes();
        let line = 1 + b[..at].iter().filter(|&&c| c == b'\n').count();
        let col = 1 + at - b[..at].iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
        Error::file(path, format!("not UTF-8 text: invalid byte 0x{:02x} at line {line}, column {col}", b[at]))
    })
}

/// At most `max` characters of `s` for an error message, with "…" when cut.
pub fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_line_and_column() {
        let e = super::utf8(std::path::Path::new("t.txt"), b"ok\nab\xffc\n".to_vec()).unwrap_err().to_string();
        assert_eq!(e, "t.txt: not UTF-8 text: invalid byte 0xff at line 2, column 3");
        assert_eq!(super::excerpt("abcdef", 3), "abc…");
        assert_eq!(super::excerpt("ab", 3), "ab");
    }
}
