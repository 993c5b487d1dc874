//! Abuse on loopback, in process: slowloris and saturated admission limits
//! (small limits injected), checking that good traffic and established
//! streams are unharmed and that the newest work is the one refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use runewarp::server::admission::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP: &str = "app.runewarp.test";
const UP: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_block_a_good_visitor_and_is_cut_at_the_5s_deadline() {
    init();
    let (_dir, backend, server, client) = Rig::up(APP).await.parts();

    // 2,000 connections from 8 source addresses, each trickling the start
    // of a ClientHello at 1 byte per second.
    let prefix = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    let mut slow = Vec::new();
    for i in 0..2000u32 {
        let public = server.public;
        slow.push(tokio::spawn(async move {
            let mut tcp = connect_from(2 + (i % 8) as u8, public)
                .await
                .expect("connect");
            let start = Instant::now();
            for b in prefix {
                if tcp.write_all(&[b]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 1];
                match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
                    Ok(_) => break, // EOF or reset: the Server closed us
                    Err(_) => continue,
                }
            }
            start.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let v = visitor(server.public, APP, &[backend.cert.clone().unwrap()])
        .await
        .unwrap();
    assert_eq!(roundtrip(v, b"good").await.unwrap(), b"good");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "good Visitor took {took:?} during slowloris"
    );

    let mut closed_at = Vec::new();
    for t in slow {
        closed_at.push(
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let (min, max) = (
        closed_at.iter().min().unwrap(),
        closed_at.iter().max().unwrap(),
    );
    eprintln!("good Visitor {took:?}; slowloris closed between {min:?} and {max:?}");
    assert!(
        *min >= Duration::from_millis(4500),
        "closed before the deadline: {min:?}"
    );
    assert!(
        *max <= Duration::from_millis(7000),
        "closed long after the 5 s deadline: {max:?}"
    );
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_limits_refuse_the_newest_and_leave_established_streams_alone() {
    init();
    let limits = Limits {
        client_hello_intake: 6,
        per_source_ip: 3,
        quic_handshakes: 4,
        pending_stream_opens: 4,
        stream_open_deadline: Duration::from_secs(5),
        routed_streams: 3,
        ..Limits::default()
    };
    let (_dir, backend, server, client) = Rig::start_with_limits(APP, limits).await.parts();
    server.wait_active(APP, UP).await;
    let cert = backend.cert.clone().unwrap();

    // Routed streams: 3 established, the 4th is refused at once.
    let mut established = Vec::new();
    for _ in 0..3 {
        let v = visitor(server.public, APP, std::slice::from_ref(&cert))
            .await
            .unwrap();
        established.push(tokio::io::split(v));
    }
    let refused = Instant::now();
    assert!(
        visitor(server.public, APP, std::slice::from_ref(&cert))
            .await
            .is_err()
    );
    assert!(refused.elapsed() < Duration::from_secs(1));
    for (i, (r, w)) in established.iter_mut().enumerate() {
        let msg = format!("still fine {i}");
        w.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    // One ends; a new Visitor gets its place.
    let (_, mut w) = established.pop().unwrap();
    w.shutdown().await.unwrap();
    drop(w);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = visitor(server.public, APP, std::slice::from_ref(&cert))
        .await
        .unwrap();
    established.push(tokio::io::split(v));

    // ClientHello intake: 3 silent connections fill 127.0.0.2's share, the
    // 4th from it is closed at once; 3 more from 127.0.0.3 fill the global
    // intake, and then even a fresh address is refused at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from(2, server.public).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(refused_at_once(2, server.public).await, "per-IP limit");
    for _ in 0..3 {
        silent.push(connect_from(3, server.public).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        refused_at_once(4, server.public).await,
        "global intake limit"
    );
    // The silent ones are still waiting (not evicted for newer ones).
    for s in silent.iter_mut() {
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), s.read(&mut b))
                .await
                .is_err()
        );
    }
    // Established streams are untouched throughout.
    for (r, w) in established.iter_mut() {
        w.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
    }
    drop(silent);
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_handshake_budget_refuses_new_tunnel_connections() {
    init();
    let limits = Limits {
        quic_handshakes: 0,
        ..Limits::default()
    };
    let Rig {
        dir: _dir,
        backend: _backend,
        server,
        client,
        ..
    } = Rig::start_with_limits(APP, limits).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        server.active_id(APP).is_none(),
        "no handshake may be admitted"
    );
    assert_eq!(client.status.borrow().connections, 0);
    stop(client, server).await;
}

/// Whether a connection from `127.0.0.<last>` is closed within 500 ms (the
/// reset may even beat the end of connect).
async fn refused_at_once(last: u8, to: std::net::SocketAddr) -> bool {
    match connect_from(last, to).await {
        Err(_) => true,
        Ok(mut tcp) => closed_within(&mut tcp, Duration::from_millis(500))
            .await
            .is_some(),
    }
}
