//! TLS termination: PEM loading (rustls-pki-types `PemObject`), the rustls `ServerConfig`.
//!
//! A `ServerConfig` is part of the config snapshot: a reload builds a new one and new
//! handshakes use it, while established connections keep the one they started with.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("unreadable PEM certificate: {0}")]
    BadCertificate(String),
    #[error("no usable private key found (PKCS#8, SEC1 or PKCS#1 PEM expected)")]
    BadKey,
    #[error("private key is not supported: {0}")]
    UnsupportedKey(String),
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The leaf is outside its validity period now (RFC 5280 §4.1.2.5): every client that
    /// checks certificates would fail its handshake.
    #[error("the certificate {0}; install a current one")]
    NotValidNow(String),
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The config path the problem belongs to.
    pub fn path(&self) -> &'static str {
        match self {
            TlsError::NoCertificate | TlsError::BadCertificate(_) | TlsError::NotValidNow(_) => {
                "tls.cert"
            }
            TlsError::BadKey | TlsError::UnsupportedKey(_) | TlsError::KeyMismatch => "tls.key",
            TlsError::ClientCa(_) => "tls.client_ca",
            TlsError::Rustls(_) => "tls",
        }
    }
}

/// The one crypto provider keygate uses (ring). Installed as the process default at start-up
/// so that nothing can pick another one implicitly.
///
/// Cipher suites in preference order (keygate chooses, `ignore_client_order`): per protocol
/// version, AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305 (ring's own order puts
/// AES-256 first). This is the order of Mozilla's recommended configurations, Go's `crypto/tls`
/// and what OpenSSL clients get from nginx: AES-128 is a 128-bit security level like X25519 and
/// P-256, which protect the session keys anyway, and it takes 10 AES rounds per block instead of
/// 14 (issue 10: every response is encrypted by keygate). Only AEAD suites with forward secrecy
/// are offered, as before.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ordered_provider())
}

fn ordered_provider() -> CryptoProvider {
    use rustls::CipherSuite as C;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let tls12 = matches!(s, rustls::SupportedCipherSuite::Tls12(_));
        let rank = match s.suite() {
            C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            C::TLS13_AES_256_GCM_SHA384
            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (tls12, rank)
    });
    p
}

pub fn install_default_provider() {
    let _ = ordered_provider().install_default();
}

pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Builds the server config: TLS 1.3 (+ 1.2 unless `min` is 1.3), the provider's AEAD-only
/// suites in its order ([`provider`]: AES-128-GCM first) with server preference, ALPN h2 + http/1.1, rotating
/// session-ticket keys. Returns the leaf's expiry (unix seconds) when it can be read.
///
/// A leaf that is not valid now (expired, or `notBefore` still ahead) is refused
/// ([`TlsError::NotValidNow`]): at start, in `check`, and on reload, where the running
/// certificate stays (fresh user T5-5: a renewal hook that copied the old file swapped a valid
/// certificate for an expired one, and every client failed its handshake).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    min: MinVersion,
    client_ca_pem: Option<&[u8]>,
) -> Result<(Arc<ServerConfig>, Option<i64>), TlsError> {
    server_config_with(cert_pem, key_pem, min, client_ca_pem, None)
}

/// SHA-256 of a PEM file's text: tells a reload whether `[tls] cert` or `[tls] client_ca`
/// changed (the one digest both comparisons use, [`ClientAuth::ca_digest`] included).
pub fn cert_digest(cert_pem: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(cert_pem).into()
}

/// [`server_config`] on a reload: `running` is the [`cert_digest`] of the certificate being
/// served. A leaf that is not valid now is refused only when it would *replace* that one: the
/// same file, expired while keygate ran, does not block the rest of a reload (a fresh user,
/// T6-7: a key could not be revoked by reload once the certificate had lapsed; it keeps being
/// logged as `cert_expiring` "has expired").
pub fn server_config_with(
    cert_pem: &[u8],
    key_pem: &[u8],
    min: MinVersion,
    client_ca_pem: Option<&[u8]>,
    running: Option<&[u8; 32]>,
) -> Result<(Arc<ServerConfig>, Option<i64>), TlsError> {
    let provider = provider();
    let chain = parse_certs(cert_pem)?;
    // Every certificate in the chain, not only the leaf: an expired intermediate fails every
    // client that validates just the same (a fresh user, T6-2).
    let now = jiff::Timestamp::now().as_second();
    let invalid = chain.iter().enumerate().find_map(|(i, c)| {
        not_valid_at(c, now).map(|why| match i {
            0 => why,
            i => format!("chain's certificate {} (an intermediate) {why}", i + 1),
        })
    });
    if let Some(why) = invalid
        && running != Some(&cert_digest(cert_pem))
    {
        return Err(TlsError::NotValidNow(why));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::BadKey)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::UnsupportedKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch);
        }
        // Unknown: the key type cannot report its public key; the handshake will tell.
        Err(_) => {}
    }
    let not_after = certified.cert.first().and_then(|c| cert_not_after(c));

    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match client_ca_pem {
        Some(pem) => builder.with_client_cert_verifier(ClientAuth::new(pem)?.verifier),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(OneCert(Arc::new(certified))));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok((Arc::new(cfg), not_after))
}

/// `[tls] client_ca` as the pipeline needs it after a reload: the verifier, and a digest of the
/// CA bundle it was built from to tell whether a reload changed it.
#[derive(Clone)]
pub struct ClientAuth {
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// [`cert_digest`] of the CA bundle's PEM text.
    pub ca_digest: [u8; 32],
}

impl ClientAuth {
    /// The verifier the TLS server uses for `pem` (webpki, keygate's crypto provider).
    pub fn new(pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in parse_certs(pem).map_err(|e| TlsError::ClientCa(e.to_string()))? {
            roots
                .add(c)
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
        Ok(ClientAuth {
            verifier,
            ca_digest: cert_digest(pem),
        })
    }

    /// Whether a client's certificate chain (leaf first), verified at its handshake against
    /// an earlier `client_ca`, still verifies against this one (RFC 5280 path validation by
    /// webpki, at the current time).
    pub fn admits(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
            .is_ok()
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Reads `notAfter` from an X.509 certificate (unix seconds); `None` when it cannot be read.
pub fn cert_not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    cert_validity(cert).map(|(_, not_after)| not_after)
}

/// Why `cert` is not valid at `now` (unix seconds): "expired on …" or "is not valid before …"
/// (UTC); `None` when it is valid, or its validity cannot be read (then the TLS library and
/// the clients judge it).
pub fn not_valid_at(cert: &CertificateDer<'_>, now: i64) -> Option<String> {
    let (not_before, not_after) = cert_validity(cert)?;
    let day = |t: i64| {
        jiff::Timestamp::from_second(t)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    if now > not_after {
        Some(format!("expired on {}", day(not_after)))
    } else if now < not_before {
        Some(format!("is not valid before {}", day(not_before)))
    } else {
        None
    }
}

/// A CA bundle (`[tls] client_ca`, `[upstream] ca`) at `now`: an error when none of its
/// certificates is valid (every chain through it would fail), a warning naming the ones that
/// are not when some are (a bundle keeps old roots beside new ones during a rotation). A file
/// that does not parse is left to the code that loads it.
pub fn check_ca_validity(pem: &[u8], now: i64) -> Result<Option<String>, String> {
    let Ok(certs) = parse_certs(pem) else {
        return Ok(None);
    };
    let bad: Vec<String> = certs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| not_valid_at(c, now).map(|why| format!("certificate {} {why}", i + 1)))
        .collect();
    if bad.is_empty() {
        Ok(None)
    } else if bad.len() == certs.len() {
        Err(format!(
            "no certificate in it is valid now: {}",
            bad.join("; ")
        ))
    } else {
        Ok(Some(format!(
            "{} of {} certificates are not valid now: {}",
            bad.len(),
            certs.len(),
            bad.join("; ")
        )))
    }
}

/// Reads `notBefore` and `notAfter` from an X.509 certificate (unix seconds; RFC 5280
/// §4.1.2.5, UTCTime or GeneralizedTime). A minimal DER walk over the fixed prefix of
/// `TBSCertificate`; returns `None` on anything unexpected.
pub fn cert_validity(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&l0, rest) = rest.split_first()?;
        let (len, rest) = if l0 < 0x80 {
            (l0 as usize, rest)
        } else {
            let n = (l0 & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
    let (_, cert_body, _) = tlv(cert.as_ref())?;
    let (_, mut tbs, _) = tlv(cert_body)?;
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // explicit version
        let (_, _, rest) = tlv(tbs)?; // serial
        tbs = rest;
    } else {
        tbs = rest; // that was the serial
    }
    let (_, _, rest) = tlv(tbs)?; // signature algorithm
    let (_, _, rest) = tlv(rest)?; // issuer
    let (_, validity, _) = tlv(rest)?;
    let (tag, t, rest) = tlv(validity)?;
    let not_before = der_time(tag, t)?;
    let (tag, t, _) = tlv(rest)?;
    Some((not_before, der_time(tag, t)?))
}

/// An X.509 `Time` (UTCTime, tag 0x17, or GeneralizedTime, 0x18) as unix seconds.
fn der_time(tag: u8, t: &[u8]) -> Option<i64> {
    let t = std::str::from_utf8(t).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i16 = t.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (t.get(0..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| rest.get(r).and_then(|s| s.parse::<i8>().ok());
    let dt = jiff::civil::DateTime::new(year, n(0..2)?, n(2..4)?, n(4..6)?, n(6..8)?, n(8..10)?, 0)
        .ok()?;
    Some(
        dt.to_zoned(jiff::tz::TimeZone::UTC)
            .ok()?
            .timestamp()
            .as_second(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate valid from `from` to `until` (midnight UTC), as (PEM cert, PEM
    /// key).
    fn cert_between(from: (i32, u8, u8), until: (i32, u8, u8), ca: bool) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        p.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn unix(y: i16, m: i8, d: i8) -> i64 {
        jiff::civil::date(y, m, d)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second()
    }

    /// T5-5: the validity period is read (UTCTime before 2050, GeneralizedTime after), a leaf
    /// outside it is refused with the date, and a CA bundle is refused only when none of its
    /// certificates is valid.
    #[test]
    fn certificates_outside_their_validity_are_refused() {
        let (old, old_key) = cert_between((2019, 1, 1), (2021, 3, 4), false);
        let der = parse_certs(old.as_bytes()).unwrap().remove(0);
        assert_eq!(
            cert_validity(&der),
            Some((unix(2019, 1, 1), unix(2021, 3, 4)))
        );
        let e = server_config(old.as_bytes(), old_key.as_bytes(), MinVersion::Tls12, None)
            .err()
            .unwrap();
        assert_eq!(e.path(), "tls.cert");
        assert!(
            e.to_string().contains("expired on 2021-03-04 00:00:00 UTC"),
            "{e}"
        );
        let (future, future_key) = cert_between((2090, 6, 1), (2100, 1, 1), false);
        let e = server_config(
            future.as_bytes(),
            future_key.as_bytes(),
            MinVersion::Tls12,
            None,
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("is not valid before 2090-06-01 00:00:00 UTC"),
            "{e}"
        );
        let now = unix(2030, 1, 1);
        let (ca_old, _) = cert_between((2019, 1, 1), (2021, 1, 1), true);
        let (ca_new, _) = cert_between((2020, 1, 1), (2040, 1, 1), true);
        assert_eq!(check_ca_validity(ca_new.as_bytes(), now), Ok(None));
        let both = format!("{ca_old}{ca_new}");
        let w = check_ca_validity(both.as_bytes(), now).unwrap().unwrap();
        assert!(
            w.starts_with(
                "1 of 2 certificates are not valid now: certificate 1 expired on 2021-01-01"
            ),
            "{w}"
        );
        let e = check_ca_validity(ca_old.as_bytes(), now).unwrap_err();
        assert!(e.starts_with("no certificate in it is valid now"), "{e}");
    }

    #[test]
    fn loads_rcgen_cert_and_detects_mismatch() {
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cfg, not_after) = server_config(
            a.cert.pem().as_bytes(),
            a.signing_key.serialize_pem().as_bytes(),
            MinVersion::Tls12,
            None,
        )
        .unwrap();
        assert_eq!(cfg.alpn_protocols.len(), 2);
        // What bench/testssl.sh checks, kept from regressing without a scan (docs/tls.md):
        // server cipher order, no 0-RTT (replayable), session tickets with rotating keys,
        // AEAD + forward-secret suites only.
        assert!(cfg.ignore_client_order);
        let order: Vec<String> = cfg
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(
            &order[..4],
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            ]
        );
        assert_eq!(cfg.max_early_data_size, 0);
        assert!(cfg.ticketer.enabled());
        assert!(cfg.ticketer.lifetime() <= 24 * 3600);
        for suite in &cfg.crypto_provider().cipher_suites {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(
                name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
        // rcgen's default validity ends in 4096.
        assert_eq!(
            not_after,
            Some(
                jiff::civil::date(4096, 1, 1)
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .unwrap()
                    .timestamp()
                    .as_second()
            )
        );
        let err = server_config(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
            MinVersion::Tls12,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch), "{err}");
        assert!(matches!(
            server_config(b"", b"", MinVersion::Tls13, None),
            Err(TlsError::NoCertificate)
        ));
    }
}
