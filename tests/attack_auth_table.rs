//! Filling the failed-auth table (docs/access.md, "Brute-force throttling"): the table of
//! clients with recent failures is bounded (`[auth] failed_auth_max_clients`, 100 000 by
//! default). A fresh user noted that it could be filled at no hashing cost (one malformed token
//! per address, trivial from IPv6 /64s), and then every unverified token from an address not in
//! it got 429: legitimate newcomers were locked out. Now failures decided without hashing fill
//! at most half of it, and past it newcomers are counted by network (IPv4 /24, IPv6 /48), each
//! network with one budget. The table is made small here (16 clients, so 8 networks) to fill
//! it with a few dozen real TLS clients from 127.0.x.y addresses.

mod common;

use std::net::Ipv4Addr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// `GET /` with this token on a new HTTP/1.1 connection over TLS from `from`: the status.
async fn get_from(kg: &Keygate, from: Ipv4Addr, token: &str) -> u16 {
    let tls = kg.tls_from(from.octets()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "localhost")
        .header("x-api-key", token)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

const BY_NETWORK: &str = "keygate_failed_auth_table_full_total{action=\"by_network\"}";
const REFUSED: &str = "keygate_failed_auth_table_full_total{action=\"refused\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_failed_auth_table_does_not_lock_out_newcomers_from_other_networks() {
    let up = Upstream::start().await;
    let keys: Vec<_> = (0..4).map(|i| new_key(&format!("k{i}"))).collect();
    let mut b = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"2/h\"")
        .auth("failed_auth_max_clients = 16")
        .auth("verify_concurrency = 1")
        .admin();
    for (i, (_, hash)) in keys.iter().enumerate() {
        b = b.key(&format!("k{i}"), hash, "");
    }
    let kg = b.start();

    // Two failures an hour per client, so nothing refills while the test runs (each 429 is
    // held back a second). Malformed tokens (no hash) from 12 addresses of 127.0.1.0/24: they
    // take half the table (8 clients); the rest are counted by their /24, whose budget the
    // 9th and 10th use up.
    for i in 1..=12 {
        let s = get_from(&kg, Ipv4Addr::new(127, 0, 1, i), "kg_k0_garbage").await;
        assert!(matches!(s, 401 | 429), "{s}");
    }
    // Wrong secrets (hashed) from 12 addresses of 127.0.2.0/24: the other half of the table,
    // then their /24's budget.
    for i in 1..=12 {
        let s = get_from(&kg, Ipv4Addr::new(127, 0, 2, i), &wrong_token("k0")).await;
        assert!(matches!(s, 401 | 429), "{s}");
    }
    let m = metrics(&kg).await;
    assert_eq!(
        metric(&m, "keygate_failed_auth_tracked{table=\"clients\"}"),
        16
    );
    assert!(metric(&m, BY_NETWORK) >= 4, "{m}");
    assert_eq!(metric(&m, REFUSED), 0);
    kg.wait_log("table full event", |v| {
        v["event"] == "failed_auth_table_full" && v["action"] == "by_network"
    });

    // The table is full. A newcomer from another network: its valid key is verified (before:
    // 429 for every address not in the table).
    assert_eq!(
        get_from(&kg, Ipv4Addr::new(127, 0, 9, 9), &keys[1].0).await,
        200
    );
    // Even its wrong guesses are its network's own budget, not the flood's.
    assert_eq!(
        get_from(&kg, Ipv4Addr::new(127, 0, 8, 1), &wrong_token("k0")).await,
        401
    );
    // A newcomer inside a flooding /24 shares that network's spent budget (the price of
    // aggregation, documented); its valid key works again once the budget refills.
    assert_eq!(
        get_from(&kg, Ipv4Addr::new(127, 0, 1, 200), &keys[2].0).await,
        429
    );
    // Clients already in the table keep their own budgets.
    assert_eq!(
        get_from(&kg, Ipv4Addr::new(127, 0, 2, 1), &keys[3].0).await,
        200
    );

    // Failures from more networks than the network table holds (8): then, and only then, a
    // client in neither table is refused (the safe side), and that is counted too.
    for net in 10..=20 {
        let _ = get_from(&kg, Ipv4Addr::new(127, 0, net, 1), "kg_k0_garbage").await;
    }
    assert_eq!(
        get_from(&kg, Ipv4Addr::new(127, 0, 30, 1), &keys[2].0).await,
        429
    );
    let m = metrics(&kg).await;
    assert!(metric(&m, REFUSED) >= 1, "{m}");
    assert_eq!(
        metric(&m, "keygate_failed_auth_tracked{table=\"networks\"}"),
        8
    );
    let tokens: Vec<&str> = keys.iter().map(|(t, _)| t.as_str()).collect();
    assert_no_secrets(&kg.logs(), &tokens);
}

/// `failed_auth_max_clients` below the smallest table is refused by `check`, by TOML path.
#[test]
fn check_refuses_a_failed_auth_table_too_small() {
    let (_, hash) = new_key("k");
    let b = Keygate::builder()
        .key("k", &hash, "")
        .auth("failed_auth_max_clients = 3");
    let (_dir, config) = b.config_dir();
    let (code, _, err) = keygate_cli(&["check"], &config);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("auth.failed_auth_max_clients") && err.contains("at least 16"),
        "{err}"
    );
}
