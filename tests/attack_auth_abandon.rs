//! Requests abandoned while their token's verification is pending (a client timeout, an HTTP/2
//! reset): the failed-auth charge taken before hashing is settled by the verification's verdict,
//! not by the request, which is gone. A right token abandoned costs its address nothing; a wrong
//! one that was hashed still counts (else a guesser would abandon every guess); one never hashed
//! (given up in the queue because nobody waited) is given back, like a 503 from the queue.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::h2client::{h2_from, h2_get};
use common::*;

const RIGHT_HASHES: &str = "keygate_argon2_verifications_total{result=\"right\"}";
const WRONG_HASHES: &str = "keygate_argon2_verifications_total{result=\"wrong\"}";
const THROTTLED: &str = "keygate_auth_throttled_total";

/// `GET /` with this token from `from` on a connection of its own, as a task: aborting the task
/// resets the stream and closes the connection, and keygate drops the request.
async fn get_from(kg: &Keygate, from: Ipv4Addr, token: &str) -> tokio::task::JoinHandle<u16> {
    h2_get(&h2_from(kg, from).await, token)
}

/// Waits (at most 20 s) until `series` reaches `n`: the verification of an abandoned request
/// ends on its own.
async fn wait_metric(kg: &Keygate, series: &str, n: u64) {
    for _ in 0..200 {
        if metric(&metrics(kg).await, series) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never reached {n}:\n{}", kg.logs());
}

/// Fresh user T3-17: 25 requests with a valid, never-verified key, each reset 4 ms after it was
/// sent, throttled their address (`failed_auth_limit`), and its valid key then got 429: the
/// charge taken before hashing was given back only when the request saw the verdict. Here the
/// budget is one failure a minute, so one abandoned request is enough to show it, in both
/// places a verification can be pending: queued behind another hash, and hashing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_valid_key_abandoned_while_its_verification_is_pending_costs_its_address_nothing() {
    let up = Upstream::start().await;
    // About three seconds of hashing (a margin over the test's 0.6 s of sleeps, on a loaded
    // machine): what the abandoned request queues behind.
    let (blocker, blocker_hash) = key_with_cost("blocker", 200);
    let (queued, queued_hash) = key_with_cost("queued", 2);
    // About 1.5 s: abandoned while this hash runs.
    let (hashing, hashing_hash) = key_with_cost("hashing", 100);
    let (later, later_hash) = key_with_cost("later", 2);
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"1/min\"")
        .auth("verify_concurrency = 1")
        .key("blocker", &blocker_hash, "")
        .key("queued", &queued_hash, "")
        .key("hashing", &hashing_hash, "")
        .key("later", &later_hash, "")
        .admin()
        .start();

    // 1. Abandoned while queued: nobody waits for the verdict, so the verification is given up
    // unhashed; the charge must go back with it.
    let busy = get_from(&kg, Ipv4Addr::new(127, 0, 0, 41), &blocker).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Ipv4Addr::new(127, 0, 0, 42);
    let abandoned = get_from(&kg, client, &queued).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    abandoned.abort();
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(
        get_from(&kg, client, &queued).await.await.unwrap(),
        200,
        "the same valid key from the address whose request was abandoned (old code: 429)"
    );

    // 2. Abandoned while its hash runs: the hash finishes and finds the key right; the charge
    // must be given back although nobody is there to hear the verdict.
    let client = Ipv4Addr::new(127, 0, 0, 43);
    let before = metric(&metrics(&kg).await, RIGHT_HASHES);
    let abandoned = get_from(&kg, client, &hashing).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    abandoned.abort();
    wait_metric(&kg, RIGHT_HASHES, before + 1).await;
    assert_eq!(
        get_from(&kg, client, &later).await.await.unwrap(),
        200,
        "another valid key, never verified, from that address (old code: 429)"
    );

    assert_eq!(metric(&metrics(&kg).await, THROTTLED), 0);
    assert_no_secrets(&kg.logs(), &[&blocker, &queued, &hashing, &later]);
}

/// The other side: a wrong token whose request is abandoned while it is hashed still counts
/// against its address (the verdict confirms the failure), or a guesser would abandon every
/// guess and never be throttled. A wrong token abandoned before it was hashed costs nothing:
/// keygate spent no hash on it and the client learned nothing, as when the queue refuses one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_token_abandoned_while_it_is_hashed_still_counts() {
    let up = Upstream::start().await;
    let (blocker, blocker_hash) = key_with_cost("blocker", 200);
    let (_, hashing_hash) = key_with_cost("hashing", 100);
    let (valid, valid_hash) = key_with_cost("valid", 2);
    let kg = Keygate::builder()
        .upstream(&up)
        .auth("failed_auth_limit = \"1/min\"")
        .auth("verify_concurrency = 1")
        .key("blocker", &blocker_hash, "")
        .key("hashing", &hashing_hash, "")
        .key("valid", &valid_hash, "")
        .admin()
        .start();

    // Hashed, then abandoned: counted.
    let guesser = Ipv4Addr::new(127, 0, 0, 44);
    let guess = wrong_token("hashing");
    let abandoned = get_from(&kg, guesser, &guess).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    abandoned.abort();
    wait_metric(&kg, WRONG_HASHES, 1).await;
    assert_eq!(
        get_from(&kg, guesser, &valid).await.await.unwrap(),
        429,
        "the guesser's budget (1/min) is spent: its unverified tokens are refused"
    );

    // Abandoned while still queued, never hashed: given back.
    let busy = get_from(&kg, Ipv4Addr::new(127, 0, 0, 45), &blocker).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Ipv4Addr::new(127, 0, 0, 46);
    let abandoned = get_from(&kg, client, &wrong_token("valid")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    abandoned.abort();
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(metric(&metrics(&kg).await, WRONG_HASHES), 1, "never hashed");
    assert_eq!(get_from(&kg, client, &valid).await.await.unwrap(), 200);
    assert_no_secrets(&kg.logs(), &[&blocker, &valid, &guess]);
}
