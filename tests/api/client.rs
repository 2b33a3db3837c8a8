//! A small HTTP/1.1 client for the API tests (one request per connection),
//! so tests talk to the real server over real sockets without an HTTP client
//! crate.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct Client {
    address: SocketAddr,
    /// Sent as `Authorization: Bearer <key>` when set.
    api_key: Option<String>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == &name.to_ascii_lowercase())
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "response {} is not JSON ({err}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts the status and the error shape, and returns the error's code.
    pub fn expect_error(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            self.text()
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error without JSON content type: {}",
            self.text()
        );
        let body = self.json();
        let error = &body["error"];
        assert!(error["code"].is_string(), "no error code in {body}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "no error message in {body}"
        );
        error.clone()
    }
}

impl Client {
    pub fn new(address: SocketAddr, api_key: Option<&str>) -> Self {
        Self {
            address,
            api_key: api_key.map(str::to_string),
        }
    }

    /// The same client presenting `key` (or no key at all).
    pub fn with_key(&self, key: Option<&str>) -> Self {
        Self::new(self.address, key)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, None).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).expect("serialise request body");
        self.request("POST", path, Some(("application/json", &bytes)))
            .await
    }

    pub async fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Response {
        self.request("POST", path, Some((content_type, body))).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).expect("serialise request body");
        self.request("PUT", path, Some(("application/json", &bytes)))
            .await
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Response {
        self.request_with_headers(method, path, &[], body).await
    }

    /// A request with extra header lines (name, value).
    pub async fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Response {
        let mut stream = TcpStream::connect(self.address)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {}: {err}", self.address));
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.address
        );
        if let Some(key) = &self.api_key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = match body {
            Some((content_type, bytes)) => {
                head.push_str(&format!(
                    "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                    bytes.len()
                ));
                bytes
            }
            None => &[][..],
        };
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .expect("send request head");
        // A server refusing a body early (413) may stop reading it; its answer
        // is still there to read.
        let _ = stream.write_all(body).await;
        let mut raw = Vec::new();
        // A server that answered without reading the whole body may reset the
        // connection after its answer; what arrived before the reset counts.
        if let Err(err) = stream.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            panic!("{method} {path}: cannot read the response: {err}");
        }
        parse_response(&raw).unwrap_or_else(|| {
            panic!(
                "{method} {path}: malformed response: {}",
                String::from_utf8_lossy(&raw)
            )
        })
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let head_end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let payload = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut payload: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size_end = payload.windows(2).position(|window| window == b"\r\n")?;
        let size_text = std::str::from_utf8(&payload[..size_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        payload = &payload[size_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(payload.get(..size)?);
        payload = payload.get(size + 2..)?;
    }
}
