//! A small, fast HTTP/1.1 upstream for benchmarks and demos (not part of keygate).
//!
//! `cargo run --release --example upstream -- [ADDR]` (default 127.0.0.1:8000). Routes:
//! `/bytes?n=N` streams N bytes; `/upload` reads the body and answers its length; anything
//! else answers `ok`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Body = BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let n: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match path.as_str() {
        "/bytes" => {
            let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let take = left.min(chunk.len() as u64);
                        (
                            Ok::<_, Infallible>(Frame::data(chunk.slice(..take as usize))),
                            left - take,
                        )
                    })
                }
            });
            Ok(Response::builder()
                .header("content-length", n)
                .body(StreamBody::new(stream).boxed())
                .unwrap())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut len = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                len += f.data_ref().map_or(0, |d| d.len() as u64);
            }
            Ok(Response::new(
                Full::new(Bytes::from(len.to_string())).boxed(),
            ))
        }
        _ => Ok(Response::new(
            Full::new(Bytes::from_static(b"ok\n")).boxed(),
        )),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("upstream listening on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                .await;
        });
    }
}
