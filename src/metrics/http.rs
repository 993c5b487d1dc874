//! The `/metrics` listener: HTTP/1.1, GET only, a few connections at a
//! time, each bounded in time. Anything else gets 404 or 405.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::logging::budget;

/// Scrapes served at once; more wait in the accept queue.
const CONNECTIONS: usize = 8;
/// A connection (requests included) lasts at most this long.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve `GET /metrics` with the text `render` returns, until the task is aborted.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let listener = &listener;
    let accept = move || async move {
        match listener.accept().await {
            Ok((tcp, _)) => Some(tcp),
            Err(error) => {
                if let Some(suppressed) = budget::ACCEPT_FAILED.allow() {
                    tracing::warn!(event = "accept_failed", listener = "metrics", error = ?error.to_string(), suppressed);
                }
                None
            }
        }
    };
    let serve = |tcp| {
        let render = render.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &*render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        }
    };
    crate::sync::serve_few(CONNECTIONS, CONNECTION_DEADLINE, accept, serve).await
}

fn answer(req: &Request<Incoming>, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}
