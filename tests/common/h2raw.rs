//! A hand-written HTTP/2 client for requests that real clients refuse to send (connection-
//! specific fields, a `host` that disagrees with `:authority`, an invalid preface): frames are
//! built byte by byte (RFC 9113 §4, §6), header blocks as HPACK literals without indexing and
//! without Huffman coding (RFC 7541 §6.2.2), so what is sent is exactly what the test says.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Keygate;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PROTOCOL_ERROR: u32 = 0x1;

/// One frame as read from the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The response to one stream, as far as this client understands it.
#[derive(Debug, Default)]
pub struct StreamOutcome {
    /// `:status` when the server sent it as an indexed static-table entry (200, 204, 206, 304,
    /// 400, 404, 500: RFC 7541 Appendix A), which is what h2's encoder does for those codes.
    pub indexed_status: Option<u16>,
    pub got_headers: bool,
    pub body: Vec<u8>,
    pub reset: Option<u32>,
    pub goaway: Option<u32>,
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), ORed into `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing, new names, no Huffman (RFC 7541 §6.2.2).
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in fields {
        b.push(0x00);
        hpack_int(&mut b, 0, 7, n.len());
        b.extend_from_slice(n.as_bytes());
        hpack_int(&mut b, 0, 7, v.len());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

pub struct RawH2 {
    pub io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl RawH2 {
    /// A TLS connection negotiated as `h2`, with the client preface and an empty SETTINGS sent.
    pub async fn connect(kg: &Keygate) -> RawH2 {
        let mut io = kg.tls_stream_alpn(&[b"h2"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        io.write_all(PREFACE).await.unwrap();
        io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        RawH2 { io }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Sends a request's HEADERS (END_HEADERS; END_STREAM when `end`).
    pub async fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end: bool) {
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        let f = frame(HEADERS, flags, stream, &header_block(fields));
        self.send(&f).await;
    }

    /// The next frame, or `None` when the connection ends (EOF or error).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        self.io.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        self.io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]),
            payload,
        })
    }

    /// Reads until stream `id` ends (END_STREAM or RST_STREAM), a GOAWAY, or EOF; answers
    /// SETTINGS and PING as a client must, within 10 s.
    pub async fn outcome(&mut self, id: u32) -> StreamOutcome {
        let mut out = StreamOutcome::default();
        let read = async {
            while let Some(f) = self.read_frame().await {
                match f.kind {
                    SETTINGS if f.flags & 1 == 0 => {
                        self.send(&frame(SETTINGS, 1, 0, &[])).await;
                    }
                    0x6 if f.flags & 1 == 0 => {
                        self.send(&frame(0x6, 1, 0, &f.payload)).await;
                    }
                    GOAWAY => {
                        out.goaway = f.error_code();
                        return;
                    }
                    RST_STREAM if f.stream == id => {
                        out.reset = f.error_code();
                        return;
                    }
                    HEADERS if f.stream == id => {
                        if !out.got_headers {
                            out.indexed_status = indexed_status(&f.payload, f.flags);
                        }
                        out.got_headers = true;
                        if f.flags & END_STREAM != 0 {
                            return;
                        }
                    }
                    DATA if f.stream == id => {
                        out.body.extend_from_slice(&f.payload);
                        if f.flags & END_STREAM != 0 {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("HTTP/2 stream outcome within 10 s");
        out
    }
}

/// `:status` of a header block whose first field is an indexed static entry 8..=14.
fn indexed_status(payload: &[u8], flags: u8) -> Option<u16> {
    // PADDED (0x8) and PRIORITY (0x20) shift the block start.
    let mut at = 0;
    if flags & 0x8 != 0 {
        at += 1;
    }
    if flags & 0x20 != 0 {
        at += 5;
    }
    // A dynamic-table size update (001xxxxx) may come first.
    while payload.get(at).is_some_and(|b| b & 0xe0 == 0x20) {
        at += 1;
    }
    match payload.get(at)? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        _ => None,
    }
}
