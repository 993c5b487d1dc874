//! The mesh device agent, control side (seed 000's "Runetale client"):
//! `runewarp node up|status|logout`. It generates the device's WireGuard
//! key pair locally (the private key is written 0600 and never sent),
//! enrols with a setup key or by SSO sign-in (a URL to open in any
//! browser; no localhost callback), then follows the network map the control
//! server streams, writing each version atomically to `netmap.json` for
//! the data plane. It reconnects with backoff when the stream breaks.
//!
//! With `--tun NAME` it also runs the data plane ([`dataplane`]):
//! userspace WireGuard to every peer in the map, with the map's packet
//! filter ([`filter`]) on what arrives, and direct paths through NATs
//! ([`path`], [`probe`]): candidates exchanged as call-me-maybe signals,
//! probed from both sides at once; without one, a relay
//! ([`relay_client`]). With `--advertise-routes` it is also a Subnet
//! Connector ([`subnet_connector`]).

pub mod dataplane;
pub mod filter;
pub mod path;
pub mod probe;
pub mod relay_client;
mod route;
pub mod subnet_connector;

pub mod down;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::mesh_protocol::{
    self, ErrorBody, LoginRequest, LoginStarted, MAX_SIGNAL, NetworkMap, RegisterRequest,
    RegisterResponse, SignalEnvelope, SignalLine, SignalRequest, public_key_bytes,
};
use crate::shutdown::Shutdown;

/// The WireGuard private key (base64), 0600.
pub const KEY_FILE: &str = "wireguard.key";
/// The enrolment: control URL, device id, bearer token; 0600.
pub const ENROLMENT_FILE: &str = "enrolment.json";
/// The last network map received.
pub const NETMAP_FILE: &str = "netmap.json";
/// Signal messages received from peers, opened, one JSON line each (0600),
/// for the data plane.
pub const SIGNALS_FILE: &str = "signals.jsonl";
/// Longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stream silent for this long (the server sends keepalives every 15 s)
/// is taken as dead.
const STREAM_SILENCE: Duration = Duration::from_secs(45);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("control server {url}: {message}")]
    Control { url: String, message: String },
    #[error("data plane: {0}")]
    Dataplane(String),
    #[error(
        "the control server no longer accepts this device (revoked, removed, or its login expired); run `runewarp node logout`, then `runewarp node up` to sign in again (or enrol with a new setup key)"
    )]
    Revoked,
}

/// What `enrolment.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolment {
    pub control: String,
    pub ca_file: Option<PathBuf>,
    pub device_id: i64,
    pub token: String,
    pub organisation: String,
    pub hostname: String,
    pub addresses: Vec<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |error| NodeError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The device's key pair: loaded, or made once (never overwritten).
/// Returns the public key (base64).
pub fn load_or_create_key(state_dir: &Path) -> Result<String, NodeError> {
    let secret = load_or_create_secret(state_dir)?;
    Ok(base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes()))
}

/// The device's private key, made once if there is none.
fn load_or_create_secret(state_dir: &Path) -> Result<x25519_dalek::StaticSecret, NodeError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    fsutil::ensure_dir(state_dir, 0o700).map_err(io_err(state_dir))?;
    let path = state_dir.join(KEY_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes: [u8; 32] = b64
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    NodeError::Usage(format!(
                        "{}: not a base64 WireGuard private key; move it away to make a new one",
                        path.display()
                    ))
                })?;
            x25519_dalek::StaticSecret::from(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let secret = x25519_dalek::StaticSecret::from(bytes);
            let text = format!("{}\n", b64.encode(secret.to_bytes()));
            fsutil::write_new_atomic(&path, text.as_bytes(), 0o600).map_err(io_err(&path))?;
            tracing::info!(event = "node_key_created", path = %path.display());
            secret
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(secret)
}

pub fn load_enrolment(state_dir: &Path) -> Result<Option<Enrolment>, NodeError> {
    let path = state_dir.join(ENROLMENT_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            NodeError::Usage(format!(
                "{}: {e}; run `runewarp node logout` and enrol again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A parsed `https://host[:port]` control URL.
#[derive(Debug, Clone)]
struct ControlUrl {
    text: String,
    host: String,
    port: u16,
}

fn parse_url(text: &str) -> Result<ControlUrl, NodeError> {
    let bad = |why: &str| {
        NodeError::Usage(format!(
            "--control {text:?}: {why}; expected https://HOST[:PORT]"
        ))
    };
    let uri: hyper::Uri = text.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("no path or query"));
    }
    Ok(ControlUrl {
        text: text.trim_end_matches('/').to_string(),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: uri.port_u16().unwrap_or(443),
    })
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, NodeError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in crate::tls::material::load_ca_bundle(path)
                .map_err(|e| NodeError::Usage(e.to_string()))?
            {
                let _ = roots.add(c);
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut c = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// One connection to the control server: HTTP/2 when the server offers it
/// (ALPN), else HTTP/1.1.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(s) => s.send_request(req).await,
            Sender::Http2(s) => s.send_request(req).await,
        }
    }
}

async fn connect(url: &ControlUrl, tls: Arc<rustls::ClientConfig>) -> Result<Sender, NodeError> {
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    .map_err(|_| fail("no answer within 10 s".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| fail(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| fail(format!("TLS: {e}")))?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(stream);
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Sender::Http2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Sender::Http1(sender))
    }
}

/// POST `request` as JSON to `path` (with `token` as the bearer, if any);
/// the answer's body, or an error naming `what` was refused and why.
async fn post_json<T: Serialize>(
    url: &ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    token: Option<&str>,
    request: &T,
    what: &str,
) -> Result<Bytes, NodeError> {
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let mut sender = connect(url, tls).await?;
    let body = serde_json::to_vec(request).map_err(|e| fail(e.to_string()))?;
    let mut req = Request::post(format!("{}{path}", url.text))
        .header("host", &url.host)
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| fail(e.to_string()))?;
    let (status, body) = answer(url, sender.send_request(req)).await?;
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        return Err(fail(format!("{what} refused: {message}")));
    }
    Ok(body)
}

async fn register(
    url: &ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    request: &RegisterRequest,
) -> Result<RegisterResponse, NodeError> {
    let body = post_json(url, tls, "/v1/register", None, request, "enrolment").await?;
    serde_json::from_slice(&body).map_err(|e| NodeError::Control {
        url: url.text.clone(),
        message: format!("bad answer: {e}"),
    })
}

/// How long `node up` keeps waiting for the user to sign in (the server
/// forgets a login after 10 minutes).
const LOGIN_WAIT: Duration = Duration::from_secs(11 * 60);

/// Enrol by SSO: ask for a login URL, show it (and open it where a desktop
/// session exists), then wait until the user has signed in.
async fn sso_login(
    url: &ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    public_key: String,
    hostname: String,
) -> Result<RegisterResponse, NodeError> {
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let body = post_json(
        url,
        tls.clone(),
        "/v1/login",
        None,
        &LoginRequest {
            public_key,
            hostname,
        },
        "login",
    )
    .await?;
    let started: LoginStarted =
        serde_json::from_slice(&body).map_err(|e| fail(format!("bad answer: {e}")))?;
    // For the person at the terminal (not a log line: the URL is a
    // one-time secret).
    eprintln!(
        "To add this device to your network, sign in within {} minutes at:\n\n    {}\n",
        started.expires_in / 60,
        started.login_url
    );
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if desktop {
        let _ = std::process::Command::new("xdg-open")
            .arg(&started.login_url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    tracing::info!(event = "node_login_waiting", control = %url.text, opened_browser = desktop);
    let deadline = tokio::time::Instant::now() + LOGIN_WAIT;
    let mut backoff = Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        match wait_once(url, tls.clone(), &started.wait_token).await {
            Ok((hyper::StatusCode::OK, body)) => {
                return serde_json::from_slice(&body).map_err(|e| fail(format!("bad answer: {e}")));
            }
            Ok((hyper::StatusCode::ACCEPTED, _)) => {
                backoff = Duration::from_millis(500);
                continue;
            }
            Ok((status, body)) if status.is_client_error() => {
                let message = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| status.to_string());
                return Err(fail(format!("login refused: {message}")));
            }
            Ok((status, _)) => {
                tracing::warn!(event = "node_login_wait_failed", status = status.as_u16());
            }
            Err(e) => tracing::warn!(event = "node_login_wait_failed", error = %e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Err(fail(
        "nobody signed in within 10 minutes; run `runewarp node up` again".into(),
    ))
}

/// One `GET /v1/login/wait`: its status and body.
async fn wait_once(
    url: &ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
) -> Result<(hyper::StatusCode, Bytes), NodeError> {
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let mut sender = connect(url, tls).await?;
    let req = Request::get(format!("{}/v1/login/wait", url.text))
        .header("host", &url.host)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(e.to_string()))?;
    tokio::time::timeout(
        Duration::from_secs(60),
        answer(url, sender.send_request(req)),
    )
    .await
    .map_err(|_| fail("no answer to the login wait within 60 s".into()))?
}

/// A request's status and whole body.
async fn answer(
    url: &ControlUrl,
    sent: impl std::future::Future<
        Output = Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
    >,
) -> Result<(hyper::StatusCode, Bytes), NodeError> {
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let resp = sent.await.map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

/// The host name to enrol as: `--hostname`, else this machine's, made a
/// DNS label.
fn default_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "device".into()
    } else {
        label.chars().take(63).collect()
    }
}

/// What `node up` starts with: key made, enrolment done.
pub struct Node {
    state_dir: PathBuf,
    secret: x25519_dalek::StaticSecret,
    enrolment: Enrolment,
    url: ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    /// Each map as it arrives, for the data plane.
    maps: tokio::sync::watch::Sender<Option<NetworkMap>>,
    /// Probe-protocol signals from peers, for the data plane (which takes
    /// the receiver).
    path_signals: tokio::sync::mpsc::Sender<dataplane::direct::Call>,
    path_signals_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<dataplane::direct::Call>>>,
}

/// Probe-protocol signals queued for the data plane at most (more are
/// dropped: peers send a few a minute).
const PATH_SIGNALS_QUEUED: usize = 64;

impl Node {
    /// The receiving end of the probe-protocol signals (once; later
    /// callers get a channel nothing sends on).
    fn take_path_signals(&self) -> tokio::sync::mpsc::Receiver<dataplane::direct::Call> {
        crate::sync::lock(&self.path_signals_rx)
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1)
    }

    fn signaller(&self) -> Signaller {
        Signaller {
            url: self.url.clone(),
            tls: self.tls.clone(),
            token: self.enrolment.token.clone(),
            secret: self.secret.clone(),
        }
    }
}

/// What sending a signal message to a peer takes.
#[derive(Clone)]
pub struct Signaller {
    url: ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    secret: x25519_dalek::StaticSecret,
}

impl Signaller {
    /// Seal `message` for the peer (device `to`, public key `their_key`)
    /// and send it through the control server (`POST /v1/signal`).
    pub async fn send(
        &self,
        to: i64,
        their_key: &[u8; 32],
        message: &[u8],
    ) -> Result<(), NodeError> {
        if message.len() > MAX_SIGNAL - 16 {
            return Err(NodeError::Usage(format!(
                "the message is {} bytes; at most {}",
                message.len(),
                MAX_SIGNAL - 16
            )));
        }
        let (nonce, sealed) = mesh_protocol::seal(&self.secret, their_key, message);
        let request = SignalRequest { to, nonce, sealed };
        post_json(
            &self.url,
            self.tls.clone(),
            "/v1/signal",
            Some(&self.token),
            &request,
            "signal",
        )
        .await?;
        Ok(())
    }
}

/// Make the key, enrol if needed.
pub async fn start(
    state_dir: &Path,
    control: Option<&str>,
    setup_key: Option<&str>,
    ca_file: Option<&Path>,
    hostname: Option<&str>,
) -> Result<Node, NodeError> {
    let public_key = load_or_create_key(state_dir)?;
    let enrolment = match load_enrolment(state_dir)? {
        Some(e) => {
            if let Some(c) = control
                && c.trim_end_matches('/') != e.control
            {
                return Err(NodeError::Usage(format!(
                    "this device is enrolled with {}; run `runewarp node logout` first to use {c}",
                    e.control
                )));
            }
            e
        }
        None => {
            let Some(control) = control else {
                return Err(NodeError::Usage(
                    "not enrolled yet: pass --control URL (and --setup-key KEY, or sign in through the printed URL)".into(),
                ));
            };
            let url = parse_url(control)?;
            let hostname = hostname
                .map(str::to_string)
                .unwrap_or_else(default_hostname);
            if !crate::mesh_protocol::valid_hostname(&hostname) {
                return Err(NodeError::Usage(format!(
                    "--hostname {hostname:?}: one DNS label, a-z, 0-9 and '-'"
                )));
            }
            let r = match setup_key {
                Some(setup_key) => {
                    register(
                        &url,
                        tls_config(ca_file)?,
                        &RegisterRequest {
                            setup_key: setup_key.to_string(),
                            public_key,
                            hostname,
                        },
                    )
                    .await?
                }
                None => sso_login(&url, tls_config(ca_file)?, public_key, hostname).await?,
            };
            let e = Enrolment {
                control: url.text.clone(),
                ca_file: ca_file.map(|p| std::path::absolute(p).unwrap_or(p.to_path_buf())),
                device_id: r.device_id,
                token: r.token,
                organisation: r.organisation,
                hostname: r.hostname,
                addresses: r.addresses,
            };
            let path = state_dir.join(ENROLMENT_FILE);
            let bytes = serde_json::to_vec_pretty(&e).unwrap_or_default();
            fsutil::write_new_atomic(&path, &bytes, 0o600).map_err(io_err(&path))?;
            tracing::info!(event = "node_enrolled", device = e.device_id, organisation = %e.organisation, hostname = %e.hostname, address = %e.addresses.first().map(String::as_str).unwrap_or("-"));
            e
        }
    };
    let url = parse_url(&enrolment.control)?;
    let tls = tls_config(enrolment.ca_file.as_deref())?;
    let (path_signals, rx) = tokio::sync::mpsc::channel(PATH_SIGNALS_QUEUED);
    Ok(Node {
        secret: load_or_create_secret(state_dir)?,
        state_dir: state_dir.to_path_buf(),
        enrolment,
        url,
        tls,
        maps: tokio::sync::watch::Sender::new(None),
        path_signals,
        path_signals_rx: std::sync::Mutex::new(Some(rx)),
    })
}

/// Follow the map until `shutdown`; Err only when the device was revoked.
pub async fn run(node: Node, mut shutdown: Shutdown) -> Result<(), NodeError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let followed = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            r = follow(&node) => r,
        };
        match followed {
            Err(NodeError::Revoked) => return Err(NodeError::Revoked),
            Err(e) => {
                tracing::warn!(event = "node_disconnected", error = %e, retry_in_ms = backoff.as_millis() as u64);
            }
            Ok(()) => {
                tracing::info!(
                    event = "node_disconnected",
                    error = "stream ended",
                    retry_in_ms = backoff.as_millis() as u64
                );
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One map stream: apply every line until it ends.
async fn follow(node: &Node) -> Result<(), NodeError> {
    let url = &node.url;
    let fail = |m: String| NodeError::Control {
        url: url.text.clone(),
        message: m,
    };
    let mut sender = connect(url, node.tls.clone()).await?;
    let req = Request::get(format!("{}/v1/map", url.text))
        .header("host", &url.host)
        .header("authorization", format!("Bearer {}", node.enrolment.token))
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if resp.status() == hyper::StatusCode::UNAUTHORIZED {
        return Err(NodeError::Revoked);
    }
    if !resp.status().is_success() {
        return Err(fail(format!("map stream refused: {}", resp.status())));
    }
    tracing::info!(event = "node_connected", control = %url.text, device = node.enrolment.device_id);
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(STREAM_SILENCE, body.frame()).await {
            Err(_) => return Err(fail("map stream silent for 45 s".into())),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(fail(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        if pending.len() > 16 << 20 {
            return Err(fail("a map line over 16 MiB".into()));
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Ok(e) = serde_json::from_slice::<ErrorBody>(line) {
                if e.error == "revoked" {
                    return Err(NodeError::Revoked);
                }
                return Err(fail(e.error));
            }
            if let Ok(s) = serde_json::from_slice::<SignalLine>(line) {
                received(node, &s.signal)?;
                continue;
            }
            let map: NetworkMap =
                serde_json::from_slice(line).map_err(|e| fail(format!("bad map: {e}")))?;
            apply(&node.state_dir, &map)?;
            node.maps.send_replace(Some(map));
        }
    }
}

/// Open a signal message from a peer and dispatch it: probe-protocol
/// messages (call-me-maybe) go to the data plane, anything else is
/// recorded in `signals.jsonl`.
fn received(node: &Node, s: &SignalEnvelope) -> Result<(), NodeError> {
    let opened = public_key_bytes(&s.from_key).and_then(|from| {
        mesh_protocol::open(&node.secret, &from, &s.nonce, &s.sealed).map(|m| (from, m))
    });
    let Some((from, message)) = opened else {
        tracing::warn!(
            event = "signal_rejected",
            from = s.from,
            reason = "does_not_open"
        );
        return Ok(());
    };
    if let Some(signal) = probe::PathSignal::parse(&message) {
        if node
            .path_signals
            .try_send(dataplane::direct::Call { from, signal })
            .is_err()
        {
            tracing::debug!(
                event = "path_signal_dropped",
                from = s.from,
                reason = "queue_full"
            );
        }
        return Ok(());
    }
    let state_dir = &node.state_dir;
    let line = serde_json::json!({
        "from": s.from,
        "from_key": s.from_key,
        "message": String::from_utf8_lossy(&message),
    });
    let path = state_dir.join(SIGNALS_FILE);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?
    };
    use std::io::Write;
    writeln!(file, "{line}").map_err(io_err(&path))?;
    tracing::info!(
        event = "signal_received",
        from = s.from,
        bytes = message.len()
    );
    Ok(())
}

/// `node signal`: seal `message` for the peer named `to` in this device's
/// network map and send it through the control server.
pub async fn send_signal(state_dir: &Path, to: &str, message: &str) -> Result<String, NodeError> {
    let Some(enrolment) = load_enrolment(state_dir)? else {
        return Err(NodeError::Usage(
            "not enrolled yet: run `runewarp node up` first".into(),
        ));
    };
    let path = state_dir.join(NETMAP_FILE);
    let map: NetworkMap = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| NodeError::Usage(format!("{}: {e}", path.display())))?,
        Err(_) => {
            return Err(NodeError::Usage(
                "no network map yet: is `runewarp node up` running?".into(),
            ));
        }
    };
    let Some(peer) = map.peers.iter().find(|p| p.hostname == to) else {
        return Err(NodeError::Usage(format!(
            "{to:?} is not a peer in this device's network map (see `runewarp node status`)"
        )));
    };
    let Some(their_key) = public_key_bytes(&peer.public_key) else {
        return Err(NodeError::Usage(format!("{to:?} has no valid public key")));
    };
    let signaller = Signaller {
        url: parse_url(&enrolment.control)?,
        tls: tls_config(enrolment.ca_file.as_deref())?,
        secret: load_or_create_secret(state_dir)?,
        token: enrolment.token,
    };
    signaller
        .send(peer.id, &their_key, message.as_bytes())
        .await?;
    Ok(format!("delivered to {to}\n"))
}

/// Write the map for the data plane (atomically) and log it.
fn apply(state_dir: &Path, map: &NetworkMap) -> Result<(), NodeError> {
    let path = state_dir.join(NETMAP_FILE);
    let bytes = serde_json::to_vec_pretty(map).unwrap_or_default();
    fsutil::write_atomic(&path, &bytes, 0o600).map_err(io_err(&path))?;
    tracing::info!(
        event = "netmap_applied",
        serial = map.serial,
        peers = map.peers.len(),
        filter_rules = map.filter.len()
    );
    Ok(())
}

/// `node status`: the enrolment and the last map, for people.
pub fn status(state_dir: &Path) -> Result<String, NodeError> {
    let Some(e) = load_enrolment(state_dir)? else {
        return Ok(format!(
            "not enrolled (state dir {}); run `runewarp node up --control URL --setup-key KEY`\n",
            state_dir.display()
        ));
    };
    let mut out = format!(
        "organisation: {}\ndevice: {} (id {})\naddresses: {}\ncontrol: {}\n",
        e.organisation,
        e.hostname,
        e.device_id,
        e.addresses.join(", "),
        e.control
    );
    let path = state_dir.join(NETMAP_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            let map: NetworkMap = serde_json::from_slice(&b)
                .map_err(|err| NodeError::Usage(format!("{}: {err}", path.display())))?;
            out += &format!("map serial: {}\npeers: {}\n", map.serial, map.peers.len());
            if !map.node.routes.is_empty() {
                out += &format!("serving routes: {}\n", map.node.routes.join(", "));
            }
            let plane = dataplane::load_status(state_dir);
            for p in &map.peers {
                out += &format!(
                    "  {}\t{}\t{}",
                    p.hostname,
                    p.allowed_ips.first().map(String::as_str).unwrap_or("-"),
                    p.user.as_deref().unwrap_or("-")
                );
                // Beyond its own /32 and /128: subnets it serves to us.
                if let Some(routes) = p.allowed_ips.get(2..).filter(|r| !r.is_empty()) {
                    out += &format!("\troutes {}", routes.join(","));
                }
                if let Some(s) = plane
                    .as_ref()
                    .and_then(|s| s.peers.iter().find(|s| s.public_key == p.public_key))
                {
                    out += &format!(
                        "\t{} {}\trtt {}\thandshake {}\trx {} tx {}",
                        s.path,
                        s.endpoint.as_deref().unwrap_or("-"),
                        s.rtt_ms
                            .map(|r| format!("{r}ms"))
                            .unwrap_or_else(|| "-".into()),
                        s.last_handshake_s
                            .map(|h| format!("{h}s ago"))
                            .unwrap_or_else(|| "never".into()),
                        s.rx_bytes,
                        s.tx_bytes
                    );
                }
                out += "\n";
            }
            if let Some(s) = &plane {
                let age = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    .saturating_sub(s.updated_unix);
                out += &format!(
                    "data plane: {} udp/{} (filter dropped {}; as of {age}s ago{})\n",
                    s.interface,
                    s.listen_port,
                    s.filter_drops,
                    if age > 10 {
                        ", is `node up --tun` running?"
                    } else {
                        ""
                    }
                );
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            out += "no network map yet (is `runewarp node up` running?)\n"
        }
        Err(err) => return Err(io_err(&path)(err)),
    }
    Ok(out)
}

/// `node logout`: forget the enrolment and the map; the key stays.
pub fn logout(state_dir: &Path) -> Result<String, NodeError> {
    let mut removed = false;
    for f in [ENROLMENT_FILE, NETMAP_FILE, dataplane::STATUS_FILE] {
        let path = state_dir.join(f);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(if removed {
        "logged out; enrol again with `runewarp node up --control URL` (sign in) or with `--setup-key KEY`\n".into()
    } else {
        "not enrolled\n".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a, b);
        assert!(crate::mesh_protocol::valid_public_key(&a));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(KEY_FILE), "junk").unwrap();
        assert!(load_or_create_key(dir.path()).is_err());
    }

    #[test]
    fn signals_are_dispatched_path_messages_to_the_data_plane_others_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = load_or_create_secret(dir.path()).unwrap();
        let (path_signals, rx) = tokio::sync::mpsc::channel(4);
        let node = Node {
            state_dir: dir.path().to_path_buf(),
            secret: secret.clone(),
            enrolment: Enrolment {
                control: "https://control.invalid".into(),
                ca_file: None,
                device_id: 1,
                token: "rwt_x".into(),
                organisation: "o".into(),
                hostname: "a".into(),
                addresses: vec![],
            },
            url: parse_url("https://control.invalid").unwrap(),
            tls: tls_config(None).unwrap(),
            maps: tokio::sync::watch::Sender::new(None),
            path_signals,
            path_signals_rx: std::sync::Mutex::new(Some(rx)),
        };
        let peer = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let b64 = base64::engine::general_purpose::STANDARD;
        let from_key = b64.encode(x25519_dalek::PublicKey::from(&peer).as_bytes());
        let mine = x25519_dalek::PublicKey::from(&secret).to_bytes();
        let envelope = |message: &str| {
            let (nonce, sealed) = mesh_protocol::seal(&peer, &mine, message.as_bytes());
            SignalEnvelope {
                from: 2,
                from_key: from_key.clone(),
                nonce,
                sealed,
            }
        };
        let call = r#"{"kind":"call-me-maybe","candidates":["192.0.2.1:41641"]}"#;
        received(&node, &envelope(call)).unwrap();
        received(&node, &envelope("hello")).unwrap();
        // Not sealed for this device: dropped.
        let mut forged = envelope(call);
        forged.from_key = b64.encode([7u8; 32]);
        received(&node, &forged).unwrap();
        let mut rx = node.take_path_signals();
        let got = rx.try_recv().unwrap();
        assert_eq!(got.from, x25519_dalek::PublicKey::from(&peer).to_bytes());
        assert_eq!(
            got.signal,
            probe::PathSignal::CallMeMaybe {
                candidates: vec!["192.0.2.1:41641".into()]
            }
        );
        assert!(rx.try_recv().is_err(), "one path signal only");
        let file = std::fs::read_to_string(dir.path().join(SIGNALS_FILE)).unwrap();
        assert_eq!(file.lines().count(), 1, "{file}");
        assert!(file.contains("hello"));
    }

    #[test]
    fn control_urls_must_be_https_origins() {
        assert_eq!(parse_url("https://c.example:7443/").unwrap().port, 7443);
        assert_eq!(parse_url("https://c.example").unwrap().port, 443);
        assert!(parse_url("http://c.example").is_err());
        assert!(parse_url("https://c.example/x").is_err());
        assert!(parse_url("c.example").is_err());
    }
}
