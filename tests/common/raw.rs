//! Hand-written HTTP/1.1 on a raw stream (TLS to keygate, or TCP in a test's own upstream): for
//! requests no client library would send, and for reading exactly what came back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::Keygate;

/// A client's TLS connection to keygate.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

impl Keygate {
    /// A TLS handshake with keygate over `tcp` (ALPN http/1.1), bounded to 10 s; a timeout is an
    /// error like a refusal.
    pub async fn handshake(&self, tcp: TcpStream) -> std::io::Result<Tls> {
        let mut cfg = self.tls_config();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connect = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        );
        tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
    }

    /// A new TLS connection (ALPN http/1.1) from the loopback address `src` (127.0.0.x): the
    /// socket is bound to it before connecting, so keygate sees `src` as the client.
    pub async fn tls_from(&self, src: [u8; 4]) -> std::io::Result<Tls> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((src, 0)))?;
        let tcp = sock.connect(self.addr).await?;
        self.handshake(tcp).await
    }

    /// A WebSocket-style upgrade of `path` with `token` on a new connection: the open tunnel
    /// after a 101, else the status keygate answered.
    pub async fn open_tunnel(&self, path: &str, token: &str) -> Result<Tls, u16> {
        let mut s = self.tls_stream().await;
        s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-API-Key: {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        match read_response(&mut s).await.0 {
            101 => Ok(s),
            status => Err(status),
        }
    }
}

/// The `Content-Length` of a response or request head (the lines before the blank line), 0 when
/// it has none.
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Reads one HTTP/1.1 response exactly: the head byte by byte, so whatever follows it (the
/// tunnel after a 101, a second response) stays unread, then a body of its Content-Length (none
/// after a 101). Returns (status, head, body). Panics when the connection closes first or the
/// response is not complete within 20 s.
pub async fn read_response(s: &mut (impl AsyncRead + Unpin)) -> (u16, String, Vec<u8>) {
    let read = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            match s.read_u8().await {
                Ok(b) => head.push(b),
                Err(e) => panic!(
                    "connection closed in the response head ({e}): {}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head[9..12].parse().unwrap();
        let len = if status == 101 {
            0
        } else {
            content_length(&head)
        };
        let mut body = vec![0; len];
        s.read_exact(&mut body)
            .await
            .unwrap_or_else(|e| panic!("connection closed in the body ({e}) after:\n{head}"));
        (status, head, body)
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("response within 20 s")
}

/// Everything the peer sends until it closes the connection (or a read fails), for at most
/// 10 s; what arrived by then is returned either way.
pub async fn read_to_close(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Writes `msg` and expects the same bytes back within 10 s (an echoing upstream behind an
/// upgraded connection).
pub async fn echo(s: &mut (impl AsyncRead + AsyncWrite + Unpin), msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(back, msg);
}
