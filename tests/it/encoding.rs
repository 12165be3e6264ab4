//! Compressed request bodies (`Content-Encoding`): gzip and zlib-wrapped
//! deflate become the same events as the plain body; other codings are
//! refused with 415 and `Accept-Encoding`, corrupt ones with 400, and a
//! body over the limit once decoded with 413, a bomb among them, without
//! ever holding more than the limit. Real clients (Python's `gzip` and
//! `zlib`, curl with gzip(1)) send what the docs tell them to.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Instant;

use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::{Compress, Compression, Crc, FlushCompress};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::{Resp, TestEnv, assert_error, get, python3, request};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `POST` a JSON body sent in `coding` to `path`.
fn post_encoded(addr: SocketAddr, path: &str, coding: &str, body: &[u8]) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", coding),
        ],
        body,
    )
    .expect("POST")
}

fn id_of(resp: &Resp) -> Uuid {
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    Uuid::parse_str(resp.json()["id"].as_str().unwrap()).unwrap()
}

/// The payload of event `id`, as the API reads it back.
fn payload(addr: SocketAddr, id: Uuid) -> Value {
    get(addr, &format!("/v1/events/{id}")).json()["payload"].clone()
}

/// A gzip file of one member holding `mib` MiB of zeros, built as an
/// attacker would, without the zeros: one MiB deflated once with a full
/// flush (byte-aligned, and referring to nothing before it), repeated,
/// then the final block and the trailer, whose CRC is combined from the
/// one MiB's rather than computed over the whole.
fn gzip_bomb(mib: u32) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut deflate = Compress::new(Compression::best(), false);
    deflate
        .compress_vec(&zeros, &mut chunk, FlushCompress::Full)
        .unwrap();
    assert_eq!(
        deflate.total_in(),
        zeros.len() as u64,
        "one call takes it all"
    );
    let mut end = Vec::with_capacity(64);
    Compress::new(Compression::best(), false)
        .compress_vec(&[], &mut end, FlushCompress::Finish)
        .unwrap();
    let mut one = Crc::new();
    one.update(&zeros);
    let mut crc = Crc::new();
    // Header: magic, deflate, no flags, no time, no extra flags, unknown OS.
    let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..mib {
        bomb.extend_from_slice(&chunk);
        crc.combine(&one);
    }
    bomb.extend_from_slice(&end);
    bomb.extend_from_slice(&crc.sum().to_le_bytes());
    bomb.extend_from_slice(&mib.wrapping_shl(20).to_le_bytes());
    bomb
}

/// A figure of this process's `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

#[test]
fn gzip_single_events_are_stored_as_if_sent_plain_on_both_routes() {
    let env = TestEnv::new("gzipone");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = r#"{"payload":{"order":42,"total":123456789012345678901234567890,"note":"señal"},"type":"order.created"}"#;

    let v1 = id_of(&post_encoded(
        addr,
        "/v1/events",
        "gzip",
        &gzip(body.as_bytes()),
    ));
    // The legacy route, and gzip's old name, in another letter case.
    let legacy = post_encoded(addr, "/Ingestion/ingest", "X-GZip", &gzip(body.as_bytes()));
    assert_eq!(legacy.json()["status"], "pending");
    let legacy = id_of(&legacy);
    let plain = id_of(&post_encoded(
        addr,
        "/v1/events",
        "identity",
        body.as_bytes(),
    ));

    let want: Value = serde_json::from_str(
        r#"{"order":42,"total":123456789012345678901234567890,"note":"señal"}"#,
    )
    .unwrap();
    for id in [v1, legacy, plain] {
        assert_eq!(payload(addr, id), want);
        assert_eq!(
            get(addr, &format!("/v1/events/{id}")).json()["type"],
            "order.created"
        );
    }
    env.wait_processed(&[v1, legacy, plain], std::time::Duration::from_secs(10));
    app.shutdown().unwrap();
}

#[test]
fn a_gzipped_batch_is_written_whole_and_in_order() {
    let env = TestEnv::new("gzipbatch");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let items: Vec<Value> = (0..50)
        .map(|i| json!({"payload": {"n": i, "pad": "x".repeat(100)}, "key": format!("k{i}")}))
        .collect();
    let body = serde_json::to_vec(&items).unwrap();
    let compressed = gzip(&body);
    assert!(compressed.len() * 10 < body.len(), "the body compresses");

    let resp = post_encoded(addr, "/v1/events", "gzip", &compressed);
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    let ids: Vec<Uuid> = resp.json()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Uuid::parse_str(v.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(ids.len(), 50);
    assert_eq!(resp.json()["duplicates"], json!([]));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(payload(addr, *id)["n"], i);
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 50);
    env.wait_processed(&ids, std::time::Duration::from_secs(20));
    app.shutdown().unwrap();
}

#[test]
fn deflate_means_zlib_and_raw_deflate_is_refused() {
    let env = TestEnv::new("deflate");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = br#"{"payload":"deflated, zlib-wrapped"}"#;

    let id = id_of(&post_encoded(addr, "/v1/events", "deflate", &zlib(body)));
    assert_eq!(payload(addr, id), "deflated, zlib-wrapped");
    let batch = br#"[{"payload":1},{"payload":2}]"#;
    let resp = post_encoded(addr, "/Ingestion/ingest", "Deflate", &zlib(batch));
    assert_eq!(resp.status, 202);
    assert_eq!(resp.json()["ids"].as_array().unwrap().len(), 2);

    let raw = post_encoded(addr, "/v1/events", "deflate", &raw_deflate(body));
    assert_error(&raw, 400, "invalid_encoding");
    assert!(
        raw.json()["detail"].as_str().unwrap().contains("zlib"),
        "{}",
        raw.json()
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 3);
    app.shutdown().unwrap();
}

#[test]
fn unsupported_codings_are_refused_415_with_accept_encoding_and_nothing_written() {
    let env = TestEnv::new("encoding415");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = br#"{"payload":1}"#;
    // A coding stacked on another is refused too: a body inflated twice is
    // how a few kilobytes become a gigabyte.
    for coding in ["br", "zstd", "compress", "nope", "gzip, gzip", "gzip, br"] {
        let resp = post_encoded(addr, "/v1/events", coding, &gzip(body));
        assert_error(&resp, 415, "unsupported_encoding");
        assert_eq!(
            resp.header("accept-encoding"),
            Some("gzip, deflate"),
            "{coding}"
        );
        assert!(
            resp.json()["detail"].as_str().unwrap().contains(coding),
            "{}",
            resp.json()
        );
    }
    // Two Content-Encoding lines are one list, so stacked as well.
    let resp = request(
        addr,
        "POST",
        "/Ingestion/ingest",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("Content-Encoding", "gzip"),
        ],
        &gzip(&gzip(body)),
    )
    .unwrap();
    assert_error(&resp, 415, "unsupported_encoding");
    // Refused on its head, so without a body too.
    let empty = post_encoded(addr, "/v1/events", "br", b"");
    assert_error(&empty, 415, "unsupported_encoding");
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);

    // identity is no coding at all.
    id_of(&post_encoded(addr, "/v1/events", "identity", body));
    app.shutdown().unwrap();
}

#[test]
fn corrupt_compressed_bodies_are_refused_400_and_nothing_written() {
    let env = TestEnv::new("encoding400");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    let body = br#"{"payload":"a body long enough to be worth compressing, twice over"}"#;
    let good = gzip(body);
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x55;
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"{}");
    let mut bad_crc = good.clone();
    let at = bad_crc.len() - 8;
    bad_crc[at] ^= 1;
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("plain JSON called gzip", "gzip", body.to_vec()),
        ("truncated gzip", "gzip", good[..good.len() / 2].to_vec()),
        (
            "gzip without its trailer",
            "gzip",
            good[..good.len() - 8].to_vec(),
        ),
        ("a flipped byte", "gzip", flipped),
        ("a wrong CRC", "gzip", bad_crc),
        ("bytes after the gzip member", "gzip", trailing),
        ("gzip called deflate", "deflate", good.clone()),
        ("truncated zlib", "deflate", zlib(body)[..10].to_vec()),
    ];
    for (what, coding, bytes) in cases {
        let resp = post_encoded(addr, "/v1/events", coding, &bytes);
        assert_eq!(
            resp.status,
            400,
            "{what}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_error(&resp, 400, "invalid_encoding");
    }
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    // What decodes is then checked like any body.
    let resp = post_encoded(addr, "/v1/events", "gzip", &gzip(b"{\"payload\":"));
    assert_error(&resp, 400, "invalid_json");
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    app.shutdown().unwrap();
}

#[test]
fn the_body_limit_holds_before_and_after_decompression() {
    let env = TestEnv::new("encodinglimit");
    let app = env.start_with(&[("INGEST_MAX_BODY_BYTES", "4096")]);
    let addr = app.http_addr().unwrap();
    let event = |len: usize| {
        let text = format!(r#"{{"payload":"{}"}}"#, "x".repeat(len));
        text.into_bytes()
    };
    let fits = event(4096 - 14);
    assert_eq!(fits.len(), 4096);
    id_of(&post_encoded(addr, "/v1/events", "gzip", &gzip(&fits)));

    // Small on the wire, over the limit once decoded.
    let over = event(4096 - 13);
    let resp = post_encoded(addr, "/v1/events", "gzip", &gzip(&over));
    assert_error(&resp, 413, "body_too_large");
    assert!(
        resp.json()["detail"]
            .as_str()
            .unwrap()
            .contains("decompressed"),
        "{}",
        resp.json()
    );
    let resp = post_encoded(addr, "/v1/events", "deflate", &zlib(&over));
    assert_error(&resp, 413, "body_too_large");
    // Over the limit on the wire: refused on its Content-Length, unread.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..5000)
        .map(|_| {
            // xorshift64: bytes that do not compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let incompressible = gzip(&noise);
    assert!(incompressible.len() > 4096);
    let resp = post_encoded(addr, "/v1/events", "gzip", &incompressible);
    assert_error(&resp, 413, "body_too_large");
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
    app.shutdown().unwrap();
}

#[test]
fn a_gzip_bomb_is_refused_413_while_inflating_and_memory_stays_bounded() {
    let env = TestEnv::new("gzipbomb");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    // 1 GiB of zeros in about a megabyte, under the 5 MiB body limit.
    let bomb = gzip_bomb(1024);
    assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
    // Test threads share this process, so its peak can only be read as a
    // bound: what ran before set the mark, and whatever runs beside this
    // test adds to it; neither comes near the gigabyte of a bomb inflated.
    let before = proc_status_bytes("VmHWM:");
    let started = Instant::now();
    let resp = post_encoded(addr, "/v1/events", "gzip", &bomb);
    let took = started.elapsed();
    let after = proc_status_bytes("VmHWM:");
    assert_error(&resp, 413, "body_too_large");
    let growth = after.saturating_sub(before);
    eprintln!(
        "gzip bomb: {} bytes on the wire, 1 GiB inflated; refused in {took:?}; \
         peak RSS {} MiB before, {} MiB after (+{} KiB)",
        bomb.len(),
        before >> 20,
        after >> 20,
        growth >> 10
    );
    assert!(
        growth < 64 << 20,
        "the peak RSS grew by {} MiB",
        growth >> 20
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 0);
    assert_eq!(env.count("SELECT count(*) FROM outbox"), 0);
    // The server serves on.
    id_of(&post_encoded(
        addr,
        "/v1/events",
        "gzip",
        &gzip(br#"{"payload":1}"#),
    ));
    app.shutdown().unwrap();
}

#[test]
fn python_gzip_and_zlib_clients_are_accepted() {
    let env = TestEnv::new("pygzip");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    // Python's standard library only: gzip and zlib compress the body,
    // urllib posts it.
    let script = r#"
import gzip, json, sys, urllib.request, zlib
url = sys.argv[1]
# Straight to the server, whatever proxy the environment names.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
    body = json.dumps({"payload": {"client": "python", "coding": coding}}).encode()
    request = urllib.request.Request(
        url, data=compress(body), method="POST",
        headers={"Content-Type": "application/json", "Content-Encoding": coding})
    with opener.open(request, timeout=10) as response:
        print(response.status, response.read().decode())
"#;
    let url = format!("http://{addr}/v1/events");
    let stdout = python3(&["-c", script, &url], b"");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, coding) in lines.iter().zip(["gzip", "deflate"]) {
        let (status, body) = line.split_once(' ').unwrap();
        assert_eq!(status, "202", "{line}");
        let id: Value = serde_json::from_str(body).unwrap();
        let id = Uuid::parse_str(id["id"].as_str().unwrap()).unwrap();
        assert_eq!(
            payload(addr, id),
            json!({"client": "python", "coding": coding})
        );
    }
    app.shutdown().unwrap();
}

#[test]
fn curl_posts_a_file_gzip_compressed() {
    let env = TestEnv::new("curlgzip");
    let app = env.start();
    let addr = app.http_addr().unwrap();
    // As the docs show it: gzip(1) compresses, curl sends the bytes as they are.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            "gzip -c | curl -sS --noproxy '*' -X POST \"$1\" \
             -H 'Content-Type: application/json' -H 'Content-Encoding: gzip' \
             --data-binary @-",
        )
        .arg("sh")
        .arg(format!("http://{addr}/v1/events"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sh with gzip and curl: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"[{"payload":"from curl"},{"payload":"and gzip"}]"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "gzip | curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = answer["ids"].as_array().expect("a batch answer");
    let payloads: Vec<Value> = ids
        .iter()
        .map(|id| payload(addr, Uuid::parse_str(id.as_str().unwrap()).unwrap()))
        .collect();
    assert_eq!(payloads, [json!("from curl"), json!("and gzip")]);
    app.shutdown().unwrap();
}
