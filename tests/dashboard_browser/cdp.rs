//! Just enough of the Chrome DevTools protocol to drive headless Chromium
//! from a test: a blocking WebSocket client (RFC 6455, text frames, client
//! masking, fragmented and large server frames) and request/response
//! matching by id, keeping the events that arrive in between.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct WebSocket {
    stream: TcpStream,
    mask_counter: u32,
}

impl WebSocket {
    /// Connects to a `ws://host:port/path` URL.
    pub fn connect(url: &str) -> std::io::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| std::io::Error::other(format!("not a ws:// URL: {url}")))?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: eGxzdG0tZm9yZWNhc3QtdGVzdA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes())?;
        // Read the handshake answer byte by byte so that no frame bytes are consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            return Err(std::io::Error::other(format!(
                "WebSocket handshake refused: {head}"
            )));
        }
        Ok(Self {
            stream,
            mask_counter: 0x5eed_1234,
        })
    }

    pub fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send_frame(0x1, text.as_bytes())
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // Clients must mask; the key need not be secret here.
        self.mask_counter = self
            .mask_counter
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        let mask = self.mask_counter.to_be_bytes();
        frame.extend_from_slice(&mask);
        frame.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, byte)| byte ^ mask[i % 4]),
        );
        self.stream.write_all(&frame)
    }

    /// The next complete text message (answering pings on the way).
    pub fn read_text(&mut self, timeout: Duration) -> std::io::Result<String> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head)?;
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut bytes = [0u8; 2];
                self.stream.read_exact(&mut bytes)?;
                len = u64::from(u16::from_be_bytes(bytes));
            } else if len == 127 {
                let mut bytes = [0u8; 8];
                self.stream.read_exact(&mut bytes)?;
                len = u64::from_be_bytes(bytes);
            }
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask)?;
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload)?;
            if masked {
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= mask[i % 4];
                }
            }
            match opcode {
                0x0..=0x2 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message).map_err(std::io::Error::other);
                    }
                }
                0x8 => {
                    return Err(std::io::Error::other(
                        "the browser closed the DevTools connection",
                    ));
                }
                0x9 => self.send_frame(0xA, &payload)?,
                _ => {}
            }
        }
    }
}

/// One DevTools session (a page or the browser).
pub struct Session {
    socket: WebSocket,
    next_id: u64,
    /// Every event received so far, in order.
    pub events: Vec<Value>,
}

impl Session {
    pub fn connect(url: &str) -> Self {
        let socket = WebSocket::connect(url)
            .unwrap_or_else(|err| panic!("DevTools connection to {url}: {err}"));
        Self {
            socket,
            next_id: 1,
            events: Vec::new(),
        }
    }

    /// Sends a command and waits for its result; panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send_text(&request.to_string())
            .unwrap_or_else(|err| panic!("send {method}: {err}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{method}: no answer within 30 s");
            let text = self
                .socket
                .read_text(left)
                .unwrap_or_else(|err| panic!("waiting for the answer to {method}: {err}"));
            let message: Value = serde_json::from_str(&text).expect("DevTools messages are JSON");
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method} failed: {error}");
                }
                return message["result"].clone();
            }
            if message.get("method").is_some() {
                self.events.push(message);
            }
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting promises) and
    /// returns its value; panics when it throws.
    pub fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {exception}");
        }
        result["result"]["value"].clone()
    }
}

/// Reads a line of the form `DevTools listening on ws://...` from Chromium's
/// standard error; the rest of it is drained on a thread (and kept for
/// diagnostics) so that Chromium never blocks on a full pipe.
pub fn devtools_url(
    stderr: impl Read + Send + 'static,
) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (sender, receiver) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        let mut sender = Some(sender);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("DevTools listening on ")
                && let Some(sender) = sender.take()
            {
                let _ = sender.send(url.trim().to_string());
            }
            let mut log = kept.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let url = receiver
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "Chromium did not report its DevTools address within 30 s; its output:\n{}",
                log.lock().unwrap()
            )
        });
    (url, log)
}

/// Decodes standard base64 (the screenshot Chromium returns).
pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("'{}' is not base64", other as char),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let mut acc = 0u32;
        for &c in &data {
            acc = (acc << 6) | value(c);
        }
        acc <<= 6 * (4 - data.len() as u32);
        let decoded = acc.to_be_bytes();
        out.extend_from_slice(&decoded[1..data.len()]);
    }
    out
}

#[test]
fn base64_round_trips_known_values() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("iVBORw0KGgo="), b"\x89PNG\r\n\x1a\n");
}
