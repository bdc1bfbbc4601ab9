//! The admin listener (plain HTTP, loopback by default, never the public port):
//! `/healthz` (process alive), `/readyz` (config loaded and upstream reachable), `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::pipeline::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Per-key quota use in the current window, for the 80 % alert (docs/alerts.yml). Read from
/// the counters at scrape time, so they cost the request path nothing.
fn set_quota_gauges(shared: &Shared) {
    let snap = shared.snapshot.load();
    let now = crate::clock::now();
    let Some(local) = shared.state.quotas.local() else {
        return;
    };
    crate::metrics::global().set_quotas(snap.keys.values().filter_map(|k| {
        k.quota
            .map(|q| (&k.id, q.period.as_str(), local.used(&k.id, q, now), q.limit))
    }));
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            let snap = shared.snapshot.load_full();
            if snap.upstream.reachable(Duration::from_secs(1)).await {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"upstream unreachable\n"),
                )
            }
        }
        "/metrics" => (StatusCode::OK, crate::metrics::CONTENT_TYPE, {
            set_quota_gauges(&shared);
            shared.buffer_budget.export();
            Bytes::from(crate::metrics::global().render())
        }),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}
