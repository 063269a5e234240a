//! `clipforge serve` end to end: the real binary on the tiny fixture model at `--port 0`, every
//! endpoint, every error status (400, 401, 404, 405, 413, 429, 503), parallel clients, results
//! equal to `embed-text` / `embed-image` whatever batch a request lands in, and SIGTERM draining a
//! request in flight before exiting 0.
mod serve_common;
use serde_json::json;
use serve_common::*;
use std::path::PathBuf;
use std::process::Command;

const ATOL: f32 = 1e-6;
const RTOL: f32 = 1e-6;

fn images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture("images")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// `clipforge SUB --model tiny --device cpu --out tmp.npy ARGS...` → rows.
fn cli_rows(sub: &str, args: &[&str]) -> Vec<Vec<f32>> {
    let out = std::env::temp_dir().join(format!("clipforge-serve-{sub}-{}-{:?}.npy", std::process::id(), std::thread::current().id()));
    let r = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args([sub, "--model", fixture("tiny").to_str().unwrap(), "--device", "cpu", "--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(r.status.success(), "{sub}: {}", String::from_utf8_lossy(&r.stderr));
    let (v, shape) = clipforge::io::npy::read_npy(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v.chunks(shape[1]).map(|r| r.to_vec()).collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[test]
fn endpoints_answer_and_match_the_cli() {
    let s = Server::start(&[]);
    assert_eq!(s.get("/health").json()["status"], "ok");
    let info = s.get("/info").json();
    assert_eq!((info["embedding_dim"].as_u64(), info["context_length"].as_u64(), info["device"].as_str()), (Some(24), Some(77), Some("cpu")));
    assert_eq!(info["model"], "tiny");

    let texts = ["a photo of a cat", "a diagram", ""];
    let r = s.post("/v1/embeddings", &json!({"input": texts, "model": "tiny"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!((j["object"].as_str(), j["model"].as_str()), (Some("list"), Some("tiny")));
    let got = rows(&j);
    let cli = cli_rows("embed-text", &texts);
    for (i, (g, c)) in got.iter().zip(&cli).enumerate() {
        assert_close(g, c, ATOL, RTOL, &format!("text {i} vs embed-text"));
    }
    // usage counts the tokens /v1/tokenize reports
    let tok = s.post("/v1/tokenize", &json!({"input": texts})).json();
    let lens: Vec<u64> = tok["data"].as_array().unwrap().iter().map(|d| d["length"].as_u64().unwrap()).collect();
    assert_eq!(j["usage"]["prompt_tokens"].as_u64(), Some(lens.iter().sum()));
    let ids = tok["data"][0]["tokens"].clone();
    assert_eq!((ids[0].as_u64(), ids.as_array().unwrap().last().unwrap().as_u64()), (Some(49406), Some(49407)));

    // token ids (with or without the start/end tokens), one string, base64: the same rows
    let content: Vec<u64> = ids.as_array().unwrap()[1..lens[0] as usize - 1].iter().map(|v| v.as_u64().unwrap()).collect();
    for input in [ids.clone(), json!(content), json!([content]), json!(texts[0])] {
        let g = rows(&s.post("/v1/embeddings", &json!({"input": input})).json());
        assert_close(&g[0], &cli[0], ATOL, RTOL, &format!("input {input}"));
    }
    let b = s.post("/v1/embeddings", &json!({"input": texts, "encoding_format": "base64"})).json();
    for (i, row) in b["data"].as_array().unwrap().iter().enumerate() {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(row["embedding"].as_str().unwrap()).unwrap();
        let v: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(v, got[i], "base64 row {i} is the float row");
    }

    // images as data URLs vs embed-image
    let paths = images();
    let urls: Vec<String> = paths.iter().map(|p| data_url(p)).collect();
    let r = s.post("/v1/embeddings", &json!({"input": urls, "modality": "image"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = rows(&r.json());
    let cli = cli_rows("embed-image", &paths.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>());
    assert_eq!(got.len(), paths.len());
    for (i, (g, c)) in got.iter().zip(&cli).enumerate() {
        assert_close(g, c, ATOL, RTOL, &format!("image {} vs embed-image", paths[i].display()));
    }

    // similarity as `clipforge similarity --json`
    let sim = s.post("/v1/similarity", &json!({"texts": ["a cat", "a dog"], "images": [urls[1], urls[2]]}));
    assert_eq!(sim.status, 200, "{}", sim.text());
    let sim = sim.json();
    let out = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args([
            "similarity",
            "--model",
            fixture("tiny").to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            "--image",
            paths[1].to_str().unwrap(),
            paths[2].to_str().unwrap(),
            "--text",
            "a cat",
            "a dog",
        ])
        .output()
        .unwrap();
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["cosine", "probs"] {
        let flat = |v: &serde_json::Value| {
            v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect::<Vec<f32>>()
        };
        assert_close(&flat(&sim[key]), &flat(&cli[key]), 1e-6, 1e-5, key);
    }

    let m = s.get("/metrics");
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let m = m.text();
    assert!(m.contains("clipforge_requests_total{endpoint=\"/v1/embeddings\",status=\"200\"}"), "{m}");
    assert!(m.contains("clipforge_batch_size_bucket{kind=\"image\",le=\"8\"}"), "{m}");
    assert!(metric(&m, "clipforge_images_total") >= 10.0 && metric(&m, "clipforge_tokens_total") > 0.0);
    assert_eq!(metric(&m, "clipforge_queue_depth"), 0.0);
}

#[test]
fn batching_does_not_change_a_requests_rows() {
    // a long wait merges concurrent requests into one batch
    let s = Server::start(&["--max-wait-ms", "300"]);
    let short = "a cat";
    let long: Vec<String> = (0..12).map(|i| format!("a long caption number {i} about a dog on a red sofa in a sunny room with {} plants", i + 3)).collect();
    let alone = rows(&s.post("/v1/embeddings", &json!({"input": short})).json()).remove(0);
    let urls: Vec<String> = images().iter().map(|p| data_url(p)).collect();
    let before = metric(&s.get("/metrics").text(), "clipforge_batch_size_count{kind=\"text\"}");
    let s = &s;
    let (merged, long_rows, image_rows) = std::thread::scope(|sc| {
        let longs: Vec<_> = long.iter().map(|t| sc.spawn(move || rows(&s.post("/v1/embeddings", &json!({"input": t})).json()).remove(0))).collect();
        let ims: Vec<_> =
            urls.iter().map(|u| sc.spawn(move || rows(&s.post("/v1/embeddings", &json!({"input": u, "modality": "image"})).json()).remove(0))).collect();
        let m = sc.spawn(move || rows(&s.post("/v1/embeddings", &json!({"input": [short]})).json()).remove(0));
        (m.join().unwrap(), longs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), ims.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>())
    });
    let m = s.get("/metrics").text();
    let batches = metric(&m, "clipforge_batch_size_count{kind=\"text\"}") - before;
    assert!(batches < 13.0, "13 concurrent text requests ran as {batches} batches: nothing was merged");
    assert_close(&merged, &alone, ATOL, RTOL, "short text merged with longer texts vs alone");
    let cli_short = cli_rows("embed-text", &[short]);
    assert_close(&merged, &cli_short[0], ATOL, RTOL, "short text merged vs embed-text");
    let mut all: Vec<&str> = long.iter().map(String::as_str).collect();
    all.push(short);
    let cli = cli_rows("embed-text", &all);
    for (i, r) in long_rows.iter().enumerate() {
        assert_close(r, &cli[i], ATOL, RTOL, &format!("long text {i}"));
    }
    let cli =
        cli_rows("embed-image", &images().iter().map(|p| p.to_str().unwrap().to_string()).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>());
    for (i, r) in image_rows.iter().enumerate() {
        assert_close(r, &cli[i], ATOL, RTOL, &format!("image {i} batched vs embed-image"));
    }
}

#[test]
fn parallel_clients_all_get_their_own_rows() {
    let s = Server::start(&[]);
    let texts: Vec<String> = (0..16).map(|i| format!("caption {i}: {}", "word ".repeat(i))).collect();
    let seq: Vec<Vec<f32>> = texts.iter().map(|t| rows(&s.post("/v1/embeddings", &json!({"input": t})).json()).remove(0)).collect();
    let url = data_url(&images()[0]);
    let img = rows(&s.post("/v1/embeddings", &json!({"input": url, "modality": "image"})).json()).remove(0);
    std::thread::scope(|sc| {
        for (c, t) in texts.iter().enumerate() {
            let (s, seq, img, url) = (&s, &seq, &img, &url);
            sc.spawn(move || {
                for k in 0..4 {
                    if (c + k) % 3 == 0 {
                        let r = s.post("/v1/embeddings", &json!({"input": url, "modality": "image"}));
                        assert_eq!(r.status, 200, "{}", r.text());
                        assert_close(&rows(&r.json())[0], img, ATOL, RTOL, "parallel image");
                    } else {
                        let r = s.post("/v1/embeddings", &json!({"input": [t, "x"]}));
                        assert_eq!(r.status, 200, "{}", r.text());
                        assert_close(&rows(&r.json())[0], &seq[c], ATOL, RTOL, &format!("parallel text {c}"));
                    }
                }
            });
        }
    });
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let s = Server::start(&["--max-inputs", "4", "--max-body-bytes", "200000", "--max-image-bytes", "60000", "--max-image-pixels", "100000"]);
    let post_raw = |body: &str| request(&s.addr, "POST", "/v1/embeddings", &[], body.as_bytes());
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"input": "a cat ".repeat(100)}), 400, "context_length_exceeded"),
        (json!({"input": (0..80).collect::<Vec<u32>>()}), 400, "context_length_exceeded"),
        (json!({"input": [49408]}), 400, "invalid_input"),
        (json!({"input": [-1]}), 400, "invalid_input"),
        (json!({"input": []}), 400, "invalid_input"),
        (json!({"input": ["a", "b", "c", "d", "e"]}), 400, "invalid_input"),
        (json!({"input": [1, "a"]}), 400, "invalid_input"),
        (json!({"input": {"a": 1}}), 400, "invalid_input"),
        (json!({"model": "x"}), 400, "invalid_input"),
        (json!({"input": "a", "encoding_format": "hex"}), 400, "invalid_input"),
        (json!({"input": "a", "modality": "audio"}), 400, "invalid_input"),
        (json!({"input": "a", "dimensions": 7}), 400, "invalid_input"),
        (json!({"input": "data:image/png;base64,AAAA", "modality": "image"}), 400, "invalid_input"),
        (json!({"input": "data:image/png;base64,@@@", "modality": "image"}), 400, "invalid_input"),
        (json!({"input": "data:image/png,abc", "modality": "image"}), 400, "invalid_input"),
        (json!({"input": fixture("images/chelsea.png").to_str().unwrap(), "modality": "image"}), 400, "invalid_input"),
        (json!({"input": data_url(&fixture("images/rocket_rgba.png")), "modality": "image"}), 413, "payload_too_large"),
        (json!({"input": [1, 2, 3]}), 200, ""),
        (json!({"input": "a cat ".repeat(100), "truncate": true}), 200, ""),
    ];
    for (body, status, code) in &cases {
        let r = s.post("/v1/embeddings", body);
        let what = body.to_string().chars().take(80).collect::<String>();
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        if *status != 200 {
            assert_eq!(r.error_code(), *code, "{what}");
        }
    }
    // a small image over the pixel limit: a 400×300 PNG written here
    let big = std::env::temp_dir().join(format!("clipforge-serve-big-{}.png", std::process::id()));
    image::RgbImage::new(400, 300).save(&big).unwrap();
    let r = s.post("/v1/embeddings", &json!({"input": data_url(&big), "modality": "image"}));
    assert_eq!((r.status, r.error_code().as_str()), (413, "payload_too_large"), "{}", r.text());
    assert!(r.text().contains("--max-image-pixels"), "{}", r.text());
    let _ = std::fs::remove_file(&big);
    // not JSON; a body over the limit; unknown route; wrong method
    assert_eq!(post_raw("{not json").error_code(), "invalid_input");
    let r = post_raw(&format!("{{\"input\": \"{}\"}}", "a".repeat(300_000)));
    assert_eq!((r.status, r.error_code().as_str()), (413, "payload_too_large"));
    let r = s.get("/v2/nothing");
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = s.get("/v1/embeddings");
    assert_eq!((r.status, r.error_code().as_str()), (405, "method_not_allowed"));
    let r = s.post("/v1/similarity", &json!({"texts": ["a"], "images": []}));
    assert_eq!(r.status, 400);
    let r = s.post("/v1/tokenize", &json!({"input": 3}));
    assert_eq!(r.status, 400);
    // still serving
    assert_eq!(s.post("/v1/embeddings", &json!({"input": "a cat"})).status, 200);
    let m = s.get("/metrics").text();
    assert!(metric(&m, "clipforge_requests_total{endpoint=\"/v1/embeddings\",status=\"400\"}") >= 15.0, "{m}");
}

#[test]
fn file_paths_only_when_allowed() {
    let s = Server::start(&["--allow-file-paths"]);
    let p = fixture("images/chelsea.png");
    let r = s.post("/v1/embeddings", &json!({"input": [p.to_str().unwrap(), data_url(&p)], "modality": "image"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let g = rows(&r.json());
    assert_close(&g[0], &g[1], 0.0, 0.0, "path vs data URL");
    let r = s.post("/v1/embeddings", &json!({"input": "/no/such/image.png", "modality": "image"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("/no/such/image.png"));
}

#[test]
fn api_key_is_required_but_health_stays_open() {
    let s = Server::start(&["--api-key", "sekret"]);
    let body = json!({"input": "a cat"}).to_string();
    let r = request(&s.addr, "POST", "/v1/embeddings", &[], body.as_bytes());
    assert_eq!((r.status, r.error_code().as_str()), (401, "invalid_api_key"));
    let r = request(&s.addr, "POST", "/v1/embeddings", &[("Authorization", "Bearer wrong!")], body.as_bytes());
    assert_eq!(r.status, 401);
    assert_eq!(request(&s.addr, "GET", "/metrics", &[], b"").status, 401);
    let r = request(&s.addr, "POST", "/v1/embeddings", &[("Authorization", "Bearer sekret")], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn over_the_concurrency_limit_is_429_and_a_stalled_request_times_out() {
    let s = Server::start(&["--max-concurrent-requests", "1", "--request-timeout-s", "1.5"]);
    // a request whose body is half sent holds the one slot
    let held = partial(&s.addr, "/v1/embeddings", &json!({"input": "a held request"}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = s.post("/v1/embeddings", &json!({"input": "a cat"}));
    assert_eq!((r.status, r.error_code().as_str()), (429, "too_many_requests"), "{}", r.text());
    assert_eq!(s.get("/health").status, 200, "health is not limited");
    let r = held.finish();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.post("/v1/embeddings", &json!({"input": "a cat"})).status, 200, "the slot is free again");
    // a request that never finishes its body is answered 503 at the timeout
    let stalled = partial(&s.addr, "/v1/embeddings", &json!({"input": "never finished"}));
    let r = stalled.response();
    assert_eq!((r.status, r.error_code().as_str()), (503, "timeout"), "{}", r.text());
    let m = s.get("/metrics").text();
    assert_eq!(metric(&m, "clipforge_requests_rejected_total"), 1.0);
    assert_eq!(metric(&m, "clipforge_requests_in_flight"), 0.0);
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let mut s = Server::start(&[]);
    let held = partial(&s.addr, "/v1/embeddings", &json!({"input": "finish me"}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    s.term();
    // the server is draining: the line says so, and the held request still completes
    let line = s.log.lock().unwrap().recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(line.contains("shutting down") && line.contains("1 request"), "{line}");
    let r = held.finish();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rows(&r.json()).len(), 1);
    assert_eq!(s.wait_exit(), Some(0));
}
