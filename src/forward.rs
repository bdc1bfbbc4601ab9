//! The upstream side: a pooled hyper-util client, header rewriting (SPEC §4), timeouts and
//! protocol upgrades.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::body::{RequestBody, RequestStats};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub use crate::proto::{is_hop_by_hop, strip_hop_by_hop};

/// The protected service.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, RequestBody>,
    scheme: Scheme,
    authority: Authority,
    /// Prefix from the configured URL's path, without trailing slash ("" for none).
    base_path: String,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within the request timeout")]
    Timeout,
    #[error("request body over the limit")]
    BodyTooLarge,
    #[error("the client's request body failed (malformed framing or aborted)")]
    ClientBody,
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream request failed: {0}")]
    Other(String),
}

impl UpstreamError {
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::BodyTooLarge | UpstreamError::ClientBody | UpstreamError::Other(_) => {
                "other"
            }
        }
    }
}

/// Formats an error with its whole `source()` chain, for the operator's log.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

impl Upstream {
    /// Errors are plain messages; a message starting with `ca:` belongs to `upstream.ca`.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
        extra_ca: Option<&[u8]>,
    ) -> Result<Self, String> {
        // Checked before parsing so that an unparsable URL with a password is not echoed.
        let authority_part = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        if authority_part.contains('@') {
            return Err("URL must not contain credentials (user:password@)".to_string());
        }
        let uri: Uri = url.parse().map_err(|_| format!("invalid URL {url:?}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("URL {url:?} needs http:// or https://"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("URL {url:?} must be http:// or https://"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("URL {url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err("URL must not contain credentials".to_string());
        }
        if uri.query().is_some() {
            return Err(format!("URL {url:?} must not have a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));

        let mut roots = rustls::RootCertStore::empty();
        if scheme == Scheme::HTTPS {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
        if let Some(pem) = extra_ca {
            let certs = crate::tls::parse_certs(pem).map_err(|e| format!("ca: {e}"))?;
            for c in certs {
                roots.add(c).map_err(|e| format!("ca: {e}"))?;
            }
        }
        if scheme == Scheme::HTTPS && roots.is_empty() {
            return Err(
                "ca: no trusted root certificates for the https upstream (set upstream.ca)"
                    .to_string(),
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Ok(Upstream {
            client,
            scheme,
            authority,
            base_path,
            request_timeout,
        })
    }

    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let pq_str = pq.map_or("/", |p| p.as_str());
        let mut b = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        b = if self.base_path.is_empty() {
            b.path_and_query(
                pq.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
        } else {
            b.path_and_query(format!("{}{}", self.base_path, pq_str))
        };
        b.build().unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// Sends the request; waits for the response head. The deadline is `request_timeout` of
    /// upstream silence after the last request-body bytes went out, so a long upload is not
    /// mistaken for a slow upstream.
    pub async fn send(
        &self,
        req: http::Request<RequestBody>,
        stats: &Arc<RequestStats>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let fut = self.client.request(req);
        tokio::pin!(fut);
        let mut seen = stats.bytes();
        loop {
            tokio::select! {
                res = &mut fut => {
                    return res.map_err(|e| {
                        if stats.over_limit() {
                            UpstreamError::BodyTooLarge
                        } else if stats.client_failed() {
                            UpstreamError::ClientBody
                        } else if e.is_connect() {
                            UpstreamError::Connect(Chain(&e).to_string())
                        } else {
                            UpstreamError::Other(Chain(&e).to_string())
                        }
                    });
                }
                () = tokio::time::sleep(self.request_timeout) => {
                    let now = stats.bytes();
                    if now == seen {
                        return Err(UpstreamError::Timeout);
                    }
                    seen = now;
                }
            }
        }
    }
}

/// What the upstream must be told about the client (SPEC §4).
pub struct ForwardInfo<'a> {
    pub peer: IpAddr,
    pub peer_is_trusted_proxy: bool,
    pub request_id: &'a HeaderValue,
    pub identity_header: &'a HeaderName,
    pub key_id: &'a HeaderValue,
    pub credential_header: &'a HeaderName,
    /// The `Upgrade` value to forward (`proto::upgrade_offer`), if the request may upgrade.
    pub upgrade: Option<HeaderValue>,
}

/// Rewrites a client request's headers for the upstream.
pub fn rewrite_request_headers(h: &mut HeaderMap, info: &ForwardInfo<'_>) {
    // The host the client asked for, for X-Forwarded-Host (h2: from :authority, set by caller).
    let host = h.get(header::HOST).cloned();
    strip_hop_by_hop(h, info.upgrade.clone());
    // Credentials never leave keygate; the identity header is ours alone.
    h.remove(info.credential_header);
    h.remove(header::AUTHORIZATION);
    h.remove(info.identity_header);
    remove_underscore_lookalikes(h, &[info.identity_header, info.credential_header]);
    h.insert(info.identity_header.clone(), info.key_id.clone());
    // Host is set by the client from the upstream URI.
    h.remove(header::HOST);

    // X-Forwarded-For: a trusted proxy's chain is extended with the proxy; an untrusted
    // client's header is discarded (it would let anyone claim any address upstream).
    let mut xff = String::new();
    if info.peer_is_trusted_proxy {
        for v in h.get_all(&X_FORWARDED_FOR).iter() {
            if let Ok(s) = v.to_str() {
                if !xff.is_empty() {
                    xff.push_str(", ");
                }
                xff.push_str(s.trim());
            }
        }
    } else {
        h.remove(&FORWARDED);
        h.remove(&X_FORWARDED_HOST);
    }
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    use std::fmt::Write as _;
    let _ = write!(xff, "{}", info.peer);
    h.remove(&X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    if !h.contains_key(&X_FORWARDED_HOST) {
        if let Some(host) = host {
            h.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
    h.insert(X_REQUEST_ID.clone(), info.request_id.clone());
}

/// Removes headers whose names equal one of `names` once `_` is read as `-`
/// (`X_Keygate_Key_Id`). CGI-style upstreams (WSGI, PHP, Rack) turn both spellings into the
/// same variable (`HTTP_X_KEYGATE_KEY_ID`), so a client's copy could stand in for keygate's
/// identity header, or carry a credential past its removal. nginx drops such names by default
/// (`underscores_in_headers off`) for the same reason. No allocation unless one is present.
fn remove_underscore_lookalikes(h: &mut HeaderMap, names: &[&HeaderName]) {
    let same = |n: &HeaderName| {
        let n = n.as_str().as_bytes();
        n.contains(&b'_')
            && names.iter().any(|m| {
                let m = m.as_str().as_bytes();
                m.len() == n.len()
                    && m.iter()
                        .zip(n)
                        .all(|(a, b)| a == b || (*a == b'-' && *b == b'_'))
            })
    };
    let found: Vec<HeaderName> = h.keys().filter(|n| same(n)).cloned().collect();
    for n in found {
        h.remove(n);
    }
}

impl Upstream {
    /// Whether a TCP connection to the upstream can be opened now (for `/readyz`).
    pub async fn reachable(&self, within: Duration) -> bool {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        matches!(
            tokio::time::timeout(within, tokio::net::TcpStream::connect((host, port))).await,
            Ok(Ok(_))
        )
    }
}
