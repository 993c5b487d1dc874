//! Forwarding an authenticated request to the upstream with hyper's client
//! (one HTTP/1.1 connection per request, bodies streamed both ways with
//! backpressure, WebSocket and other upgrades spliced once the upstream
//! answers 101).

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::config::GateConfig;
use super::server::{Body, STATE_COOKIE, full};
use super::sessions::Session;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers only the gate may set; Visitor copies are dropped.
const GATE_SET: &[&str] = &[
    "x-forwarded-email",
    "x-forwarded-user",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-preferred-username",
    "x-real-ip",
    "forwarded",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// The upgrade protocol asked for (`Connection: upgrade` + `Upgrade`).
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    wants
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Drop the gate's own cookies from `Cookie` so the upstream never sees
/// session secrets.
fn strip_gate_cookies(headers: &mut HeaderMap, session_cookie: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map(|(k, _)| k).unwrap_or(pair);
            !pair.is_empty() && name != session_cookie && name != STATE_COOKIE
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(full(
        "The app behind this sign-in is not reachable right now.\n",
    ));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Set the identity and forwarding headers the upstream may trust.
pub fn set_forwarded(headers: &mut HeaderMap, config: &GateConfig, email: &str, client_ip: IpAddr) {
    for name in GATE_SET {
        headers.remove(*name);
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set("x-forwarded-email", email);
    set("x-forwarded-user", email);
    let ip = match client_ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    set("x-forwarded-for", &ip.to_string());
    set("x-forwarded-proto", config.base_url.scheme());
    set("x-forwarded-host", &config.base_url.authority());
}

pub async fn forward(
    config: &GateConfig,
    mut req: Request<Incoming>,
    session: &Session,
    client_ip: IpAddr,
    session_cookie: &str,
) -> Response<Body> {
    let upgrade = upgrade_of(req.headers());
    let visitor_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_gate_cookies(&mut parts.headers, session_cookie);
    set_forwarded(&mut parts.headers, config, &session.email, client_ip);
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    // Origin-form towards the upstream.
    if let Some(pq) = parts.uri.path_and_query().cloned()
        && let Ok(uri) = pq.as_str().parse()
    {
        parts.uri = uri;
    }
    let upstream = (config.upstream.host.as_str(), config.upstream.port);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(event = "gate_upstream_failed", upstream = %config.upstream, error = %e);
            return bad_gateway();
        }
        Err(_) => {
            tracing::warn!(event = "gate_upstream_failed", upstream = %config.upstream, error = "connect timed out");
            return bad_gateway();
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(event = "gate_upstream_failed", upstream = %config.upstream, error = %e);
            return bad_gateway();
        }
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(event = "gate_upstream_failed", upstream = %config.upstream, error = %e);
            return bad_gateway();
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(visitor_upgrade) = visitor_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(visitor), Ok(upstream)) = tokio::join!(visitor_upgrade, upstream_upgrade)
            else {
                return;
            };
            let mut visitor = TokioIo::new(visitor);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut visitor, &mut upstream).await;
        });
        let (mut parts, _) = resp.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = protocol {
            parts.headers.insert(header::UPGRADE, p);
        }
        return Response::from_parts(parts, full(bytes::Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_cookies_never_reach_the_upstream() {
        let cookies = "app=1; __Host-runegate=secret; __Host-runegate-state=s; b=2";
        let mut h = crate::gate::test_headers(&[("cookie", cookies)]);
        strip_gate_cookies(&mut h, "__Host-runegate");
        assert_eq!(h.get(header::COOKIE).unwrap(), "app=1; b=2");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = crate::gate::test_headers(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "1"),
            ("x-app", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-app"));
    }
}
