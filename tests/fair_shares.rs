//! Fair shares and readiness, in process on loopback (small limits
//! injected): one source address or one Tunnel at its own cap is refused
//! alone, other sources and Tunnels are served, and the readiness listener
//! closes only on sustained saturation of a Server-wide pool.

mod common;
#[path = "common/two_ids.rs"]
mod two_ids;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use runewarp::server::admission::Limits;
use runewarp::tls::material;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use two_ids::TwoIds;

const APP: &str = "app.runewarp.test";
const OTHER: &str = "other.runewarp.test";
const UP: Duration = Duration::from_secs(10);

async fn echo_once(
    v: &mut tokio_rustls::client::TlsStream<TcpStream>,
    msg: &[u8],
) -> std::io::Result<()> {
    v.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    v.read_exact(&mut buf).await?;
    assert_eq!(buf, msg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_share_is_refused_alone_and_readiness_stays_open() {
    init();
    let limits = Limits {
        streams_per_source: 2,
        per_source_ip: 2,
        ..Limits::default()
    };
    let (_dir, backend, server, client) = Rig::up_with_readiness(APP, limits).await.parts();
    let cert = backend.cert.clone().unwrap();

    // 127.0.0.2 holds its two streams; a third from it is refused at once,
    // from the same /32 on another port too.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut v = visitor_from(2, server.public, APP, std::slice::from_ref(&cert))
            .await
            .unwrap();
        echo_once(&mut v, b"mine").await.unwrap();
        held.push(v);
    }
    let refused = Instant::now();
    assert!(
        visitor_from(2, server.public, APP, std::slice::from_ref(&cert))
            .await
            .is_err(),
        "a third stream from one source is refused"
    );
    assert!(refused.elapsed() < Duration::from_secs(1));

    // 127.0.0.3 holds its two ClientHello intake slots (silent).
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(connect_from(3, server.public).await.unwrap());
    }

    // Both keep being refused for longer than the readiness sustain period
    // (and less than the 5 s ClientHello deadline of the silent ones);
    // readiness stays open and other sources are served throughout.
    let until = Instant::now() + Duration::from_secs(4);
    let mut rounds = 0u8;
    while Instant::now() < until {
        assert!(
            visitor_from(2, server.public, APP, std::slice::from_ref(&cert))
                .await
                .is_err()
        );
        // (The reset may even beat the end of connect.)
        let closed = match connect_from(3, server.public).await {
            Err(_) => true,
            Ok(mut extra) => closed_within(&mut extra, Duration::from_millis(500))
                .await
                .is_some(),
        };
        assert!(
            closed,
            "a third silent connection from one source is closed at once"
        );
        assert!(
            server.ready().await,
            "one source at its cap must not close readiness"
        );
        let mut good = visitor_from(
            4 + rounds % 50,
            server.public,
            APP,
            std::slice::from_ref(&cert),
        )
        .await
        .unwrap();
        echo_once(&mut good, b"good").await.unwrap();
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rounds > 5);
    for v in held.iter_mut() {
        echo_once(v, b"still mine").await.unwrap();
    }
    // Its share comes back when its streams end.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = visitor_from(2, server.public, APP, std::slice::from_ref(&cert))
        .await
        .unwrap();
    echo_once(&mut again, b"again").await.unwrap();
    drop(silent);
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_closes_only_on_sustained_saturation_of_a_server_wide_pool() {
    init();
    let limits = Limits {
        routed_streams: 3,
        streams_per_source: 2,
        ..Limits::default()
    };
    let (_dir, backend, server, client) = Rig::up_with_readiness(APP, limits).await.parts();
    let cert = backend.cert.clone().unwrap();
    assert!(server.ready().await);

    // Fill the Server-wide pool of routed streams from two sources.
    let mut held = Vec::new();
    for last in [2, 2, 3] {
        held.push(
            visitor_from(last, server.public, APP, std::slice::from_ref(&cert))
                .await
                .unwrap(),
        );
    }
    for v in held.iter_mut() {
        echo_once(v, b"x").await.unwrap();
    }

    // A burst of refusals shorter than one check interval, so at most two
    // checks see it: still ready.
    let burst_end = Instant::now() + Duration::from_millis(700);
    let watch_end = burst_end + Duration::from_secs(2);
    while Instant::now() < watch_end {
        if Instant::now() < burst_end {
            assert!(
                visitor_from(4, server.public, APP, std::slice::from_ref(&cert))
                    .await
                    .is_err()
            );
        }
        assert!(
            server.ready().await,
            "a short burst must not close readiness"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Sustained refusals: readiness closes.
    let started = Instant::now();
    loop {
        assert!(
            visitor_from(4, server.public, APP, std::slice::from_ref(&cert))
                .await
                .is_err()
        );
        if !server.ready().await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "readiness stayed open while the Server-wide pool was full"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = started.elapsed();
    eprintln!("readiness closed after {closed_after:?} of sustained saturation");
    assert!(closed_after >= Duration::from_secs(1));

    // The pool frees up: readiness reopens.
    drop(held);
    let freed = Instant::now();
    while !server.ready().await {
        assert!(
            freed.elapsed() < Duration::from_secs(5),
            "readiness did not reopen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut v = visitor_from(5, server.public, APP, std::slice::from_ref(&cert))
        .await
        .unwrap();
    echo_once(&mut v, b"back").await.unwrap();
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tunnels_pending_flood_does_not_starve_another_tunnel() {
    init();
    let ids = TwoIds::new("client", "stuck", OTHER).await;
    let cert = ids.backend.cert.clone().unwrap();
    let limits = Limits {
        pending_stream_opens: 4,
        ..Limits::default()
    };
    let mut config = server_config(
        &ids.cert_dir,
        vec![
            tunnel(0, &[APP], &[ids.other_pin]),
            tunnel(1, &[OTHER], &[ids.pin]),
        ],
    );
    config.readiness_bind_address = Some(free_tcp_addr());
    let server = TestServer::start_config(config, limits).await;
    let client =
        TestClient::passthrough(server.tunnel, &ids.ca, &ids.id_dir, OTHER, ids.backend.addr);

    // Tunnel 0's Client grants no streams at all: every Visitor for it
    // waits for a stream (until the 5 s open deadline).
    let roots = material::load_ca_bundle(&ids.ca).unwrap();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).unwrap();
    }
    let (id, _) = material::load_client_identity(&ids.other_dir).unwrap();
    let mut config =
        runewarp::tunnel::transport::client_config(store, id, Default::default()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = endpoint
        .connect_with(config, server.tunnel, SERVER_HOSTNAME)
        .unwrap()
        .await
        .unwrap();
    server.wait_active(APP, UP).await;
    server.wait_active(OTHER, UP).await;

    // A flood of Visitors for tunnel 0, more than the whole pool.
    let hello = client_hello(APP);
    let mut flood = Vec::new();
    for i in 0..8u8 {
        let mut tcp = connect_from(10 + i, server.public).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        flood.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for tcp in flood.iter_mut() {
        if closed_within(tcp, Duration::from_millis(100))
            .await
            .is_some()
        {
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        8 - server_share(4, 2),
        "tunnel 0 holds exactly its share of the pending pool"
    );

    // Tunnel 1 is served at once meanwhile.
    let started = Instant::now();
    let mut v = visitor_from(30, server.public, OTHER, std::slice::from_ref(&cert))
        .await
        .unwrap();
    echo_once(&mut v, b"not starved").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(flood);
    stuck.close(0u32.into(), b"done");
    stop(client, server).await;
}

fn server_share(pool: usize, tunnels: usize) -> usize {
    Limits {
        pending_stream_opens: pool,
        ..Limits::default()
    }
    .pending_share(tunnels)
}

/// A minimal TLS 1.2/1.3 ClientHello record with SNI `host`.
fn client_hello(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut ext = Vec::new();
    ext.extend_from_slice(&0u16.to_be_bytes());
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0, 0, 0];
    let len = body.len() as u32;
    hs[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
