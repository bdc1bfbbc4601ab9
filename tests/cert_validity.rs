//! Certificates outside their validity period (fresh user T5-5): an expired certificate passed
//! `keygate check` and a SIGHUP swapped it in over a valid one, after which every client's
//! handshake failed. Now `[tls] cert` must be valid now (not expired, `notBefore` passed) at
//! start, in `check` and on reload, where a refused certificate leaves the running one in
//! place; a CA bundle (`[tls] client_ca`, `[upstream] ca`) with no valid certificate is an
//! error, one with some expired a warning. Certificates made by rcgen; the real binary.

mod common;

use common::*;
use rustls_pki_types::CertificateDer;

type Cert = (String, String, CertificateDer<'static>);

/// A self-signed certificate for localhost valid from `from` until `until` (midnight UTC).
fn cert_between(from: (i32, u8, u8), until: (i32, u8, u8), ca: bool) -> Cert {
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    p.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    if ca {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn expired() -> Cert {
    cert_between((2019, 1, 1), (2021, 3, 4), false)
}

fn not_yet_valid() -> Cert {
    cert_between((2090, 6, 1), (2100, 1, 1), false)
}

/// `keygate check` and `keygate run` (bounded to 20 s) on a config whose certificate is
/// expired, then not yet valid: both refuse it, naming `tls.cert` and the date.
#[test]
fn check_and_start_refuse_a_certificate_that_is_not_valid_now() {
    let (_, hash) = new_key("k");
    let (dir, cfg) = Keygate::builder().key("k", &hash, "").config_dir();
    for (cert, says) in [
        (
            expired(),
            "tls.cert: the certificate expired on 2021-03-04 00:00:00 UTC",
        ),
        (
            not_yet_valid(),
            "tls.cert: the certificate is not valid before 2090-06-01 00:00:00 UTC",
        ),
    ] {
        write_cert(dir.path(), Some(cert));
        let (code, out, err) = keygate_cli(&["check"], &cfg);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains(says), "{err}");
        let (code, out, err) = run_refused(&cfg, &[]);
        assert_eq!(code, 1, "keygate run: {out}{err}");
        assert!(format!("{out}{err}").contains(says), "{out}{err}");
    }
    // A current certificate: ok again.
    write_cert(dir.path(), None);
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// The certificate a new TLS handshake with keygate presents (trusting any of `roots`).
async fn presented(kg: &Keygate, roots: &[&CertificateDer<'static>]) -> CertificateDer<'static> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(kg.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("handshake with the running certificate");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A SIGHUP after an expired, then a not-yet-valid certificate was copied over the running
/// one: `config_reload_failed` naming `tls.cert` and the date, and new handshakes still get the
/// running certificate (on the old code the reload succeeded and they got the expired one). A
/// current certificate is then swapped in as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_certificate_that_is_not_valid_now_keeps_the_running_one() {
    let (_, hash) = new_key("k");
    let kg = Keygate::builder().key("k", &hash, "").start();
    let running = kg.ca.clone();
    for (cert, says) in [
        (expired(), "expired on 2021-03-04"),
        (not_yet_valid(), "is not valid before 2090-06-01"),
    ] {
        let bad = cert.2.clone();
        write_cert(kg.dir.path(), Some(cert));
        let ev = reload(&kg).await;
        assert_eq!(ev["event"], "config_reload_failed", "{ev}");
        let error = ev["error"].as_str().unwrap();
        assert!(error.contains("tls.cert") && error.contains(says), "{ev}");
        assert_eq!(presented(&kg, &[&running, &bad]).await, running);
    }
    let fresh = write_cert(kg.dir.path(), None);
    assert_eq!(reload(&kg).await["event"], "config_reloaded");
    assert_eq!(presented(&kg, &[&running, &fresh]).await, fresh);
}

/// CA bundles: `[tls] client_ca` whose only certificate has expired is an error naming it; one
/// that also holds a valid certificate passes with a warning (a rotation keeps old roots beside
/// new ones); `[upstream] ca` likewise.
#[test]
fn ca_bundles_with_no_valid_certificate_are_refused() {
    let (_, hash) = new_key("k");
    let old = cert_between((2019, 1, 1), (2021, 1, 1), true).0;
    let current = cert_between((2020, 1, 1), (2090, 1, 1), true).0;
    let with_client_ca = |text: String| {
        text.replace(
            "key = \"key.pem\"\n",
            "key = \"key.pem\"\nclient_ca = \"ca.pem\"\n",
        )
    };
    let (dir, cfg) = Keygate::builder().key("k", &hash, "").config_dir();
    std::fs::write(&cfg, with_client_ca(std::fs::read_to_string(&cfg).unwrap())).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &old).unwrap();
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "tls.client_ca: no certificate in it is valid now: certificate 1 expired on 2021-01-01"
        ),
        "{err}"
    );
    std::fs::write(dir.path().join("ca.pem"), format!("{old}{current}")).unwrap();
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    assert!(
        err.contains("warning: tls.client_ca: 1 of 2 certificates are not valid now"),
        "{err}"
    );

    let (dir, cfg) = Keygate::builder()
        .upstream_url("https://localhost:9")
        .upstream_line("ca = \"ca.pem\"")
        .key("k", &hash, "")
        .config_dir();
    std::fs::write(dir.path().join("ca.pem"), &old).unwrap();
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("upstream.ca: no certificate in it is valid now"),
        "{err}"
    );
}

/// A fresh user (T6-7): once the certificate being served had expired while keygate ran, every
/// SIGHUP was refused (the unchanged file failed the "valid now" rule), so a key could not be
/// revoked by reload. Only a reload that would *replace* the running certificate by one not
/// valid now is refused; the same file, expired meanwhile, lets the rest of the reload apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_while_running_does_not_block_a_reload() {
    let (token, hash) = new_key("k");
    let (gone, gone_hash) = new_key("gone");
    let base = || Keygate::builder().key("k", &hash, "");
    let kg = base().key("gone", &gone_hash, "").start();
    // A certificate valid for a few more seconds, swapped in while valid.
    let now = jiff::Timestamp::now().as_second() as u64;
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(now + 3);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    let short: Cert = (cert.pem(), key.serialize_pem(), cert.der().clone());
    write_cert(kg.dir.path(), Some(short));
    assert_eq!(reload(&kg).await["event"], "config_reloaded");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    // Expired now; revoke `gone` by reload: applied.
    let ev = common::reload::reload_with(&kg, &base().config_text()).await;
    assert_eq!(ev["event"], "config_reloaded", "{ev}");
    assert_eq!(ev["keys"], 1, "the revocation applied: {ev}");
    assert_no_secrets(&kg.logs(), &[&token, &gone, &hash, &gone_hash]);
    // Replacing it by another certificate that is not valid now is still refused.
    write_cert(kg.dir.path(), Some(expired()));
    assert_eq!(reload(&kg).await["event"], "config_reload_failed");
}

/// A fresh user (T6-2): only the leaf's dates were checked, so a chain whose intermediate had
/// expired passed `check` and was swapped in by a reload; every validating client then failed.
/// Every certificate in `[tls] cert` is checked now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_with_an_expired_intermediate_is_refused() {
    let (_, hash) = new_key("k");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.not_before = rcgen::date_time_ymd(2018, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2090, 1, 1);
    let root = rcgen::Issuer::new(ca, ca_key);
    let mid_key = rcgen::KeyPair::generate().unwrap();
    let mut mid = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    mid.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    mid.not_before = rcgen::date_time_ymd(2019, 1, 1);
    mid.not_after = rcgen::date_time_ymd(2021, 5, 6);
    let mid_cert = mid.signed_by(&mid_key, &root).unwrap();
    let mid_issuer = rcgen::Issuer::new(mid, mid_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2090, 1, 1);
    let leaf_cert = leaf.signed_by(&leaf_key, &mid_issuer).unwrap();
    let chain: Cert = (
        format!("{}{}", leaf_cert.pem(), mid_cert.pem()),
        leaf_key.serialize_pem(),
        leaf_cert.der().clone(),
    );

    let (dir, cfg) = Keygate::builder().key("k", &hash, "").config_dir();
    write_cert(dir.path(), Some(chain.clone()));
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("tls.cert")
            && err.contains("intermediate")
            && err.contains("expired on 2021-05-06"),
        "{err}"
    );
    // A reload to it keeps the running certificate.
    let kg = Keygate::builder().key("k", &hash, "").start();
    write_cert(kg.dir.path(), Some(chain));
    let ev = reload(&kg).await;
    assert_eq!(ev["event"], "config_reload_failed", "{ev}");
    assert!(
        ev["error"].as_str().unwrap().contains("intermediate"),
        "{ev}"
    );
}
