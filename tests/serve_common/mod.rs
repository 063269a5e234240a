//! For tests/serve.rs: the real `clipforge serve` binary started on a fixture model at `--port 0`
//! (the port read from its stderr line), and a tiny blocking HTTP/1.1 client over `TcpStream`
//! (one request per connection, `Connection: close`), plus partial requests that hold a
//! connection open mid-body.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A running server; killed when dropped (unless already waited for).
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Every stderr line after the listening line.
    pub log: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// `clipforge serve --model tests/fixtures/tiny --device cpu --port 0 EXTRA...`.
    pub fn start(extra: &[&str]) -> Server {
        let model = fixture("tiny");
        let mut child = Command::new(env!("CARGO_BIN_EXE_clipforge"))
            .args(["serve", "--model", model.to_str().unwrap(), "--device", "cpu", "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start clipforge serve");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        loop {
            let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("serve printed no listening line; exit: {:?}", child.try_wait()));
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_string();
                return Server { child, addr, log: std::sync::Mutex::new(rx) };
            }
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], b"")
    }
    pub fn post(&self, path: &str, json: &serde_json::Value) -> Response {
        request(&self.addr, "POST", path, &[], json.to_string().as_bytes())
    }

    /// SIGTERM to the server.
    pub fn term(&self) {
        // SAFETY: kill(2) on the pid of a child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits (up to 20 s) for the server to exit; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server did not exit within 20 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("status {} body is not JSON ({e}): {}", self.status, self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// The OpenAI-style error code of a JSON error body, checking its shape.
    pub fn error_code(&self) -> String {
        let j = self.json();
        let e = &j["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "not an error body: {j}");
        e["code"].as_str().unwrap().to_string()
    }
}

fn head(method: &str, path: &str, headers: &[(&str, &str)], len: usize) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h + "\r\n"
}

/// One request, its whole response.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head(method, path, headers, body.len()).as_bytes()).unwrap();
    // a server may answer (413) and close before reading the body: a failed write is fine then
    let _ = s.write_all(body);
    read_response(s)
}

/// A request whose body is sent only in part: the server holds it in flight until `finish`.
pub struct Partial {
    stream: TcpStream,
    rest: Vec<u8>,
}

pub fn partial(addr: &str, path: &str, json: &serde_json::Value) -> Partial {
    let body = json.to_string().into_bytes();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head("POST", path, &[], body.len()).as_bytes()).unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    s.write_all(a).unwrap();
    s.flush().unwrap();
    Partial { stream: s, rest: b.to_vec() }
}

impl Partial {
    pub fn finish(mut self) -> Response {
        self.stream.write_all(&self.rest).unwrap();
        read_response(self.stream)
    }
    /// The response without sending the rest (the server answered early, e.g. a timeout).
    pub fn response(self) -> Response {
        read_response(self.stream)
    }
}

fn read_response(mut s: TcpStream) -> Response {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

/// `data:image/png;base64,...` of a file.
pub fn data_url(path: &Path) -> String {
    use base64::Engine;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()))
}

/// Rows of a `/v1/embeddings` float response.
pub fn rows(j: &serde_json::Value) -> Vec<Vec<f32>> {
    j["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r["index"].as_u64(), Some(i as u64));
            assert_eq!(r["object"], "embedding");
            r["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
        })
        .collect()
}

/// Per element |x − ref| ≤ atol + rtol·|ref|.
pub fn assert_close(x: &[f32], r: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(x.len(), r.len(), "{what}: lengths");
    for (i, (a, b)) in x.iter().zip(r).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}: element {i}: {a} vs {b}");
    }
}
