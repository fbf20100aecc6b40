//! A webhook receiver for alert tests: a `TcpListener` thread on 127.0.0.1 that records
//! every request and answers 200, or 500 for the first N.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
    /// The status the receiver answered.
    pub answered: u16,
    /// When the receiver accepted its connection.
    pub at: Instant,
}

/// A webhook receiver on 127.0.0.1: records every request, answers 500 to the first
/// `fail_first` and 200 to the rest.
pub struct Receiver {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    pub fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = AtomicUsize::new(0);
        let h = Arc::clone(&hits);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let at = Instant::now();
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let Some(Request {
                    method,
                    path,
                    headers,
                    body,
                }) = read_request(&mut s)
                else {
                    continue;
                };
                let answered = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                    500
                } else {
                    200
                };
                let content_type = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let body = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
                h.lock().unwrap().push(Hit {
                    method,
                    path,
                    content_type,
                    body,
                    answered,
                    at,
                });
                let reason = if answered == 200 {
                    "OK"
                } else {
                    "Internal Server Error"
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {answered} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver { port, hits }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/rsb", self.port)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Alerts answered 200 (delivered), in order.
    pub fn delivered(&self) -> Vec<Value> {
        self.hits()
            .into_iter()
            .filter(|h| h.answered == 200)
            .map(|h| h.body)
            .collect()
    }

    /// Delivered alerts with `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.delivered()
            .into_iter()
            .filter(|b| b["event"] == event)
            .collect()
    }
}

/// One HTTP/1.1 request as read by the receiver.
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Request line, headers and body (by Content-Length) of one HTTP/1.1 request.
pub fn read_request(s: &mut impl Read) -> Option<Request> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw[end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}
