//! The control API (HTTP/1.1 + JSON over TLS; see docs/control-api.md):
//! `POST /v1/register` enrols a device with a setup key, `GET /v1/map`
//! streams its network map as JSON lines, one per change. With
//! `[control.oidc]`, `POST /v1/login` + `GET /v1/login/wait` enrol a device
//! by SSO, and the browser routes `GET /login/ID` and `GET /oidc/callback`
//! carry the user through the identity provider ([`super::oidc`]);
//! `POST /v1/signal` forwards a sealed message to a peer; `POST
//! /v1/endpoints` records where a device's data plane can be reached.
//! `POST /v1/routes` records the subnets a Subnet Connector offers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::config::ControlConfig;
use super::netmap;
use super::netmap::OrgSnapshot;
use super::oidc::{self as sso, Oidc, Outcome, Waited};
use super::store::Device;
use super::store::{RegisterError, Store, StoreError};
use crate::mesh_protocol::{
    EndpointsRequest, ErrorBody, LoginPending, LoginRequest, LoginStarted, MAX_ENDPOINTS,
    MAX_ROUTES, MAX_SIGNAL, RegisterRequest, RegisterResponse, RoutesRequest, SignalEnvelope,
    SignalLine, SignalRequest, check_route, valid_endpoint, valid_hostname, valid_public_key,
};
use crate::shutdown::Shutdown;

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted.
const MAX_BODY: usize = 4096;
/// Registrations per source address per [`RATE_WINDOW`].
const REGISTER_RATE: u32 = 20;
/// Signal messages one device may send per [`RATE_WINDOW`].
const SIGNAL_RATE: u32 = 120;
/// Refused map requests (unknown or revoked tokens) per source address per
/// [`RATE_WINDOW`]; beyond it, 429 without a look-up.
const MAP_REFUSAL_RATE: u32 = 60;
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// A map stream with no change sends an empty line this often, so dead
/// connections are noticed by both ends.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// What every request handler shares.
pub(super) struct Api {
    pub store: Arc<Mutex<Store>>,
    pub serial: tokio::sync::watch::Receiver<u64>,
    pub shutdown: Shutdown,
    registrations: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Refused map requests per source address.
    map_refusals: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Signal messages sent per device.
    signals_sent: Mutex<HashMap<i64, (Instant, u32)>>,
    /// Where each connected device's signal messages go: its map stream
    /// (with that stream's number, so an old stream cannot remove a newer
    /// one's entry).
    inboxes: Mutex<HashMap<i64, (u64, tokio::sync::mpsc::Sender<Bytes>)>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Each organisation as of the latest change (and the change serial it
    /// was last checked at), shared by its streams.
    snapshots: Mutex<HashMap<i64, (u64, Arc<OrgSnapshot>)>>,
    /// SSO sign-in, when configured.
    pub oidc: Option<Arc<Oidc>>,
    pub config: Arc<ControlConfig>,
    /// `POST /v1/login` and refused waits per source address.
    login_starts: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Browser requests (`/login/ID`, `/oidc/callback`) per source address.
    web_hits: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Relay tokens for the maps, when `[[control.relays]]` lists relays.
    relays: Option<super::relay_tokens::Issuer>,
}

/// Logins started (and refused waits) per source address per
/// [`RATE_WINDOW`].
const LOGIN_RATE: u32 = 20;
/// Browser requests per source address per [`RATE_WINDOW`].
const WEB_RATE: u32 = 60;
/// How long one `GET /v1/login/wait` waits before answering "pending".
const WAIT_POLL: Duration = Duration::from_secs(25);

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message.to_string(),
        },
    )
}

/// The answer to a device's report of `count` items the store replaced:
/// `{"stored": count}`, logged as `event`, or a storage error.
fn stored(
    event: &'static str,
    device: i64,
    count: usize,
    result: Result<bool, StoreError>,
) -> Response<Body> {
    match result {
        Ok(changed) => {
            tracing::info!(event, device, count, changed);
            json(StatusCode::OK, &serde_json::json!({ "stored": count }))
        }
        Err(e) => {
            tracing::error!(event = "store_failed", error = %e);
            error(StatusCode::INTERNAL_SERVER_ERROR, "storage error")
        }
    }
}

impl Api {
    pub fn new(
        store: Arc<Mutex<Store>>,
        serial: tokio::sync::watch::Receiver<u64>,
        shutdown: Shutdown,
        config: Arc<ControlConfig>,
        oidc: Option<Arc<Oidc>>,
    ) -> Self {
        Self {
            oidc,
            config,
            login_starts: Mutex::new(HashMap::new()),
            web_hits: Mutex::new(HashMap::new()),
            store,
            serial,
            shutdown,
            registrations: Mutex::new(HashMap::new()),
            map_refusals: Mutex::new(HashMap::new()),
            signals_sent: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(0),
            snapshots: Mutex::new(HashMap::new()),
            relays: None,
        }
    }

    /// Hand out tokens for the relays `issuer` signs for.
    pub fn with_relays(mut self, issuer: super::relay_tokens::Issuer) -> Self {
        self.relays = Some(issuer);
        self
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        crate::sync::lock(&self.store)
    }

    /// Organisation `org_id` as of the latest change seen: read from the
    /// store once per change, whatever the number of its streams.
    /// A change elsewhere leaves the same `Arc`, so its streams skip the
    /// work.
    /// With `fresh`, read the store even when the cache looks current (the
    /// change poll may not have seen a change made a moment ago).
    fn snapshot(&self, org_id: i64, fresh: bool) -> Result<Arc<OrgSnapshot>, StoreError> {
        let seen = *self.serial.borrow();
        let mut cache = crate::sync::lock(&self.snapshots);
        if let Some((checked, s)) = cache.get(&org_id)
            && *checked >= seen
            && !fresh
        {
            return Ok(s.clone());
        }
        let fresh = OrgSnapshot::load(&self.store(), org_id)?;
        let checked = fresh.serial;
        let snapshot = match cache.get(&org_id) {
            Some((_, old)) if old.same_content(&fresh) => old.clone(),
            _ => Arc::new(fresh),
        };
        cache.insert(org_id, (checked, snapshot.clone()));
        Ok(snapshot)
    }

    /// Count a registration attempt from `ip`; false when over the rate.
    fn admit(&self, ip: IpAddr) -> bool {
        count(&self.registrations, ip, false) <= REGISTER_RATE
    }
}

/// The attempts counted for `ip` in the current [`RATE_WINDOW`], after
/// adding one unless `peek`.
fn count<K: std::hash::Hash + Eq>(
    table: &Mutex<HashMap<K, (Instant, u32)>>,
    ip: K,
    peek: bool,
) -> u32 {
    let mut map = crate::sync::lock(table);
    let now = Instant::now();
    if map.len() > 10_000 {
        map.retain(|_, (at, _)| now.duration_since(*at) < RATE_WINDOW);
    }
    let entry = map.entry(ip).or_insert((now, 0));
    if now.duration_since(entry.0) >= RATE_WINDOW {
        *entry = (now, 0);
    }
    if !peek {
        entry.1 += 1;
    }
    entry.1
}

impl Api {
    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/register") => self.register(peer, req).await,
            (&Method::GET, "/v1/map") => self.map(peer, req),
            (&Method::POST, "/v1/signal") => self.signal(peer, req).await,
            (&Method::POST, "/v1/login") => self.login(peer, req).await,
            (&Method::GET, "/v1/login/wait") => self.login_wait(peer, req).await,
            (&Method::GET, "/oidc/callback") => self.callback(peer, req).await,
            (&Method::GET, p) if p.starts_with("/login/") => self.login_page(peer, req).await,
            (&Method::POST, "/v1/endpoints") => self.endpoints(peer, req).await,
            (&Method::POST, "/v1/routes") => self.routes(peer, req).await,
            (
                _,
                "/v1/register" | "/v1/map" | "/v1/signal" | "/v1/login" | "/v1/login/wait"
                | "/v1/endpoints" | "/v1/routes",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    async fn register(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        if !self.admit(peer.ip().to_canonical()) {
            return rate_limited(
                "register_rate_limited",
                peer,
                "too many registrations; wait a minute",
            );
        }
        let read = read_device(req, |r: &RegisterRequest| (&r.public_key, &r.hostname));
        let r = match read.await {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        let result = self
            .store()
            .register(&r.setup_key, &r.public_key, &r.hostname);
        match result {
            Ok(Ok((d, token))) => {
                tracing::info!(event = "device_registered", device = d.id, organisation = %d.organisation, hostname = %d.hostname, address = %d.ipv4, peer = %peer);
                json(
                    StatusCode::OK,
                    &RegisterResponse {
                        device_id: d.id,
                        token,
                        organisation: d.organisation,
                        hostname: d.hostname,
                        addresses: vec![d.ipv4.to_string(), d.ipv6.to_string()],
                    },
                )
            }
            Ok(Err(e @ RegisterError::BadSetupKey)) => {
                if let Some(suppressed) = crate::logging::budget::REGISTER_REFUSED.allow() {
                    tracing::info!(event = "register_refused", reason = "bad_setup_key", peer = %peer, suppressed);
                }
                error(StatusCode::UNAUTHORIZED, &e.to_string())
            }
            Ok(Err(e @ RegisterError::KeyTaken)) => {
                if let Some(suppressed) = crate::logging::budget::REGISTER_REFUSED.allow() {
                    tracing::info!(event = "register_refused", reason = "key_taken", peer = %peer, suppressed);
                }
                error(StatusCode::CONFLICT, &e.to_string())
            }
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                error(StatusCode::INTERNAL_SERVER_ERROR, "storage error")
            }
        }
    }

    /// The device a request's bearer token names, or the answer to give.
    /// Refusals count against the source address (60 a minute, then 429
    /// without a look-up).
    fn authenticate<B>(
        &self,
        peer: SocketAddr,
        req: &Request<B>,
    ) -> Result<Device, Box<Response<Body>>> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ip = peer.ip().to_canonical();
        if count(&self.map_refusals, ip, true) >= MAP_REFUSAL_RATE {
            return Err(Box::new(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many refused requests; wait a minute",
            )));
        }
        let refused = |why: &'static str| {
            count(&self.map_refusals, ip, false);
            if let Some(suppressed) = crate::logging::budget::MAP_REFUSED.allow() {
                tracing::info!(event = "map_refused", reason = why, peer = %peer, suppressed);
            }
            error(StatusCode::UNAUTHORIZED, "unknown or revoked device")
        };
        let Some(token) = token else {
            return Err(Box::new(refused("missing_token")));
        };
        let found = self.store().device_by_token(token);
        let found = found.and_then(|d| match d {
            Some(d) if !d.revoked => Ok((self.store().login_expired(d.id)?, Some(d))),
            other => Ok((false, other)),
        });
        let found = match found {
            Ok((true, _)) => return Err(Box::new(refused("login_expired"))),
            Ok((false, d)) => Ok(d),
            Err(e) => Err(e),
        };
        match found {
            Ok(Some(d)) if !d.revoked => Ok(d),
            Ok(Some(_)) => Err(Box::new(refused("revoked"))),
            Ok(None) => Err(Box::new(refused("unknown_token"))),
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                Err(Box::new(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage error",
                )))
            }
        }
    }

    /// `POST /v1/signal`: forward a sealed message to a connected peer the
    /// sender's map lists. The server cannot open it: it never holds a
    /// device's private key.
    async fn signal(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let sender = match self.authenticate(peer, &req) {
            Ok(d) => d,
            Err(answer) => return *answer,
        };
        if count(&self.signals_sent, sender.id, false) > SIGNAL_RATE {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many signal messages; wait a minute",
            );
        }
        let r: SignalRequest = match read_json(req).await {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let well_formed = b64.decode(&r.nonce).is_ok_and(|n| n.len() == 12)
            && b64
                .decode(&r.sealed)
                .is_ok_and(|b| (16..=MAX_SIGNAL).contains(&b.len()));
        if !well_formed {
            return error(
                StatusCode::BAD_REQUEST,
                "nonce must be 12 bytes and box 16 to 2048 bytes, base64",
            );
        }
        // Only to a peer the sender's own map lists: nothing across
        // organisations or past the policy.
        let allowed = self
            .snapshot(sender.org_id, false)
            .ok()
            .and_then(|s| netmap::compute_from(&s, sender.id))
            .is_some_and(|m| m.peers.iter().any(|p| p.id == r.to));
        if !allowed {
            return error(
                StatusCode::NOT_FOUND,
                "no such peer in this device's network map",
            );
        }
        let inbox = crate::sync::lock(&self.inboxes)
            .get(&r.to)
            .map(|(_, tx)| tx.clone());
        let line = line(&SignalLine {
            signal: SignalEnvelope {
                from: sender.id,
                from_key: sender.public_key.clone(),
                nonce: r.nonce,
                sealed: r.sealed,
            },
        });
        match inbox.map(|tx| tx.try_send(line)) {
            Some(Ok(())) => {
                tracing::debug!(event = "signal_forwarded", from = sender.id, to = r.to);
                json(StatusCode::OK, &serde_json::json!({"delivered": true}))
            }
            Some(Err(tokio::sync::mpsc::error::TrySendError::Full(_))) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the peer's inbox is full; retry",
            ),
            _ => error(StatusCode::CONFLICT, "the peer is not connected"),
        }
    }

    /// `POST /v1/endpoints`: store where the device's data plane listens;
    /// its peers' maps carry them from the next change on.
    async fn endpoints(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let (device, r) = match self.device_request::<EndpointsRequest>(peer, req).await {
            Ok(x) => x,
            Err(answer) => return *answer,
        };
        if r.endpoints.len() > MAX_ENDPOINTS || !r.endpoints.iter().all(|e| valid_endpoint(e)) {
            return error(
                StatusCode::BAD_REQUEST,
                "endpoints must be at most 16 IP:PORT addresses",
            );
        }
        let result = self.store().set_endpoints(device.id, &r.endpoints);
        stored("endpoints_stored", device.id, r.endpoints.len(), result)
    }

    /// An authenticated device's small JSON request, rate-limited like
    /// signals.
    async fn device_request<T: serde::de::DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<(Device, T), Box<Response<Body>>> {
        let device = self.authenticate(peer, &req)?;
        if count(&self.signals_sent, device.id, false) > SIGNAL_RATE {
            return Err(Box::new(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests; wait a minute",
            )));
        }
        Ok((device, read_json(req).await?))
    }

    /// `POST /v1/routes`: the subnets this device offers to serve as a
    /// Subnet Connector; they reach peers once approved.
    async fn routes(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let (device, r) = match self.device_request::<RoutesRequest>(peer, req).await {
            Ok(x) => x,
            Err(answer) => return *answer,
        };
        if r.routes.len() > MAX_ROUTES {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("at most {MAX_ROUTES} routes"),
            );
        }
        if let Some(e) = r.routes.iter().find_map(|x| check_route(x).err()) {
            return error(StatusCode::BAD_REQUEST, &e);
        }
        let result = self.store().set_routes(device.id, &r.routes);
        stored("routes_stored", device.id, r.routes.len(), result)
    }

    fn map(self: Arc<Self>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let device = match self.authenticate(peer, &req) {
            Ok(d) => d,
            Err(answer) => return *answer,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(stream_maps(
            self.clone(),
            device.id,
            device.org_id,
            peer,
            tx,
        ));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-ndjson")
            .header("cache-control", "no-store")
            .body(StreamBody::new(stream).boxed_unsync())
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
    }
}

/// A JSON request body of at most [`MAX_BODY`], or the answer to give.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Box<Response<Body>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body over 4 KiB",
            )));
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &format!("bad request: {e}"))))
}

/// A JSON request naming a device (its key and hostname, as `device`
/// picks them out), checked as enrolment needs them, or the answer.
async fn read_device<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    device: fn(&T) -> (&String, &String),
) -> Result<T, Box<Response<Body>>> {
    let r = read_json(req).await?;
    let (public_key, hostname) = device(&r);
    check_device(public_key, hostname)?;
    Ok(r)
}

/// The 429 for an enrolment `peer` sent too often, logged as `event`
/// within the refusal log budget.
fn rate_limited(event: &'static str, peer: SocketAddr, message: &str) -> Response<Body> {
    if let Some(suppressed) = crate::logging::budget::REGISTER_REFUSED.allow() {
        tracing::warn!(event, peer = %peer, suppressed);
    }
    error(StatusCode::TOO_MANY_REQUESTS, message)
}

/// A device's key and hostname as enrolment needs them, or the answer.
fn check_device(public_key: &str, hostname: &str) -> Result<(), Box<Response<Body>>> {
    if !valid_public_key(public_key) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "public_key must be a base64 X25519 key (32 bytes)",
        )));
    }
    if !valid_hostname(hostname) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "hostname must be one DNS label: a-z, 0-9 and '-', at most 63",
        )));
    }
    Ok(())
}

fn html(status: StatusCode, title: &str, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(sso::page(title, message))).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

/// One query parameter, decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// SSO sign-in (see [`super::oidc`]).
impl Api {
    fn sso(&self) -> Result<Arc<Oidc>, Box<Response<Body>>> {
        self.oidc.clone().ok_or_else(|| {
            Box::new(error(
                StatusCode::NOT_FOUND,
                "SSO sign-in is not configured on this server ([control.oidc]); use a setup key",
            ))
        })
    }

    /// `POST /v1/login`: a login URL and a wait token for this device.
    async fn login(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let sso = match self.sso() {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        if count(&self.login_starts, peer.ip().to_canonical(), false) > LOGIN_RATE {
            return rate_limited("login_rate_limited", peer, "too many logins; wait a minute");
        }
        let read = read_device(req, |r: &LoginRequest| (&r.public_key, &r.hostname));
        let r = match read.await {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        let Some(started) = sso.start(&r.public_key, &r.hostname) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many pending logins; retry later",
            );
        };
        tracing::info!(event = "login_started", login = %&started.id[..8], hostname = %r.hostname, peer = %peer);
        json(
            StatusCode::OK,
            &LoginStarted {
                login_url: started.login_url,
                wait_token: started.wait_token,
                expires_in: sso::LOGIN_TTL.as_secs(),
            },
        )
    }

    /// `GET /v1/login/wait`: the login's result once the user finished,
    /// else 202 after [`WAIT_POLL`].
    async fn login_wait(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let sso = match self.sso() {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        let ip = peer.ip().to_canonical();
        if count(&self.login_starts, ip, true) > LOGIN_RATE {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many refused requests; wait a minute",
            );
        }
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("")
            .to_string();
        let mut shutdown = self.shutdown.clone();
        let waited = tokio::select! {
            w = sso.wait(&token, WAIT_POLL) => w,
            _ = shutdown.wait() => Waited::Pending,
        };
        match waited {
            Waited::Done(Outcome::Enrolled(r)) => json(StatusCode::OK, &r),
            Waited::Done(Outcome::Refused(m)) => error(StatusCode::FORBIDDEN, &m),
            Waited::Pending => json(
                StatusCode::ACCEPTED,
                &LoginPending {
                    status: "pending".into(),
                },
            ),
            Waited::Unknown => {
                count(&self.login_starts, ip, false);
                error(
                    StatusCode::UNAUTHORIZED,
                    "unknown, used or expired login; start again",
                )
            }
        }
    }

    /// The sign-in service for a browser request from `peer`, once the
    /// web rate limit admits it.
    fn web_sso(&self, peer: SocketAddr) -> Result<Arc<Oidc>, Box<Response<Body>>> {
        let sso = self.sso()?;
        if count(&self.web_hits, peer.ip().to_canonical(), false) > WEB_RATE {
            return Err(Box::new(html(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests",
                "Wait a minute, then try again.",
            )));
        }
        Ok(sso)
    }

    /// `GET /login/ID`: on to the identity provider.
    async fn login_page(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let sso = match self.web_sso(peer) {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        let id = req.uri().path().trim_start_matches("/login/");
        match sso.authorize(id).await {
            Ok(Some(url)) => Response::builder()
                .status(StatusCode::FOUND)
                .header("location", url)
                .header("cache-control", "no-store")
                .body(Full::new(Bytes::new()).boxed_unsync())
                .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response")),
            Ok(None) => html(
                StatusCode::NOT_FOUND,
                "Login not found",
                "This login link is unknown, used or expired. Run `runewarp node up` again for a new one.",
            ),
            Err(e) => {
                tracing::warn!(event = "oidc_unavailable", error = %e);
                html(
                    StatusCode::BAD_GATEWAY,
                    "Identity provider unavailable",
                    "The control server cannot reach the identity provider; try again shortly.",
                )
            }
        }
    }

    /// `GET /oidc/callback`: the identity provider sends the browser back.
    async fn callback(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let sso = match self.web_sso(peer) {
            Ok(s) => s,
            Err(answer) => return *answer,
        };
        let state = query_param(&req, "state").unwrap_or_default();
        let code = query_param(&req, "code");
        // An OAuth error code is a short token; anything else is cut down
        // before it reaches a page or a log line.
        let idp_error = query_param(&req, "error").map(|e| {
            e.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .take(64)
                .collect::<String>()
        });
        let (id, public_key, hostname, who) = match sso
            .callback(
                &state,
                code.as_deref(),
                idp_error.as_deref(),
                query_param(&req, "iss").as_deref(),
            )
            .await
        {
            Ok(v) => v,
            Err(sso::CallbackError::UnknownState) => {
                tracing::info!(event = "login_refused", reason = "unknown_state", peer = %peer);
                return html(
                    StatusCode::BAD_REQUEST,
                    "Login not recognised",
                    "This sign-in is unknown, was already used or has expired. Run `runewarp node up` again.",
                );
            }
            Err(sso::CallbackError::Refused { login, message }) => {
                tracing::info!(event = "login_refused", login = %&login[..8.min(login.len())], reason = %message, peer = %peer);
                sso.finish(&login, Outcome::Refused(message.clone()));
                return html(StatusCode::FORBIDDEN, "Sign-in refused", &message);
            }
        };
        let short = &id[..8.min(id.len())];
        let Some(record) = sso::login_record(&self.config, &who) else {
            let m = format!(
                "{} is not an email address this server can place",
                who.email
            );
            sso.finish(&id, Outcome::Refused(m.clone()));
            return html(StatusCode::FORBIDDEN, "Sign-in refused", &m);
        };
        let result = self.store().login_device(&record, &public_key, &hostname);
        match result {
            Ok(Ok((d, token))) => {
                tracing::info!(event = "login_completed", login = %short, device = d.id, organisation = %d.organisation, user = %who.email, admin = record.admin, groups = who.groups.len(), peer = %peer);
                let message = format!(
                    "Signed in as {}. Device {} joined organisation {} with address {}. You can close this window.",
                    who.email, d.hostname, d.organisation, d.ipv4
                );
                sso.finish(
                    &id,
                    Outcome::Enrolled(crate::mesh_protocol::RegisterResponse {
                        device_id: d.id,
                        token,
                        organisation: d.organisation,
                        hostname: d.hostname,
                        addresses: vec![d.ipv4.to_string(), d.ipv6.to_string()],
                    }),
                );
                html(StatusCode::OK, "Signed in", &message)
            }
            Ok(Err(e)) => {
                tracing::info!(event = "login_refused", login = %short, reason = "key_taken", peer = %peer);
                sso.finish(&id, Outcome::Refused(e.to_string()));
                html(StatusCode::CONFLICT, "Sign-in refused", &e.to_string())
            }
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                sso.finish(&id, Outcome::Refused("storage error".into()));
                html(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Sign-in failed",
                    "Storage error.",
                )
            }
        }
    }
}

/// A hash of a serialised map without its leading `"serial"` field (the
/// first field of `NetworkMap`): equal for maps that differ only there.
fn content_hash(line: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let rest = line
        .iter()
        .position(|b| *b == b',')
        .map_or(line, |i| &line[i..]);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rest.hash(&mut h);
    h.finish()
}

fn line<T: Serialize>(v: &T) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// Signal messages waiting for one device's stream.
const SIGNAL_INBOX: usize = 32;

/// Removes a stream's inbox when the stream ends (unless a newer stream of
/// the same device replaced it).
struct Unregister {
    api: Arc<Api>,
    device: i64,
    number: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let mut inboxes = crate::sync::lock(&self.api.inboxes);
        if inboxes
            .get(&self.device)
            .is_some_and(|(n, _)| *n == self.number)
        {
            inboxes.remove(&self.device);
        }
    }
}

/// Push `device`'s map now and after every change that alters it, until
/// the device goes away, is revoked, or the server shuts down.
async fn stream_maps(
    api: Arc<Api>,
    device: i64,
    org_id: i64,
    peer: SocketAddr,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let mut serial = api.serial.clone();
    let mut shutdown = api.shutdown.clone();
    // What was last sent, as a hash of the map without its serial: keeping
    // whole maps would cost the server one full mesh per stream.
    let mut last: Option<u64> = None;
    tracing::info!(event = "map_stream_opened", device, peer = %peer);
    let mut last_snapshot: Option<Arc<OrgSnapshot>> = None;
    let (inbox_tx, mut inbox) = tokio::sync::mpsc::channel::<Bytes>(SIGNAL_INBOX);
    let number = api
        .next_stream
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::sync::lock(&api.inboxes).insert(device, (number, inbox_tx));
    let _unregister = Unregister {
        api: api.clone(),
        device,
        number,
    };
    // This device's relay tokens, and when to hand out new ones.
    let mut relays = Vec::new();
    let mut relays_due = tokio::time::Instant::now();
    loop {
        serial.borrow_and_update();
        let refresh = api.relays.is_some() && tokio::time::Instant::now() >= relays_due;
        let mut snapshot = match api.snapshot(org_id, false) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                break;
            }
        };
        // The same snapshot as last time: nothing in this organisation
        // changed, nothing to compute.
        if refresh
            || !last_snapshot
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(l, &snapshot))
        {
            let mut map = netmap::compute_from(&snapshot, device);
            if map.is_none() {
                // Not in the cached snapshot: enrolled a moment ago, or
                // revoked. Only the store can say which.
                match api.snapshot(org_id, true) {
                    Ok(s) => snapshot = s,
                    Err(e) => {
                        tracing::error!(event = "store_failed", error = %e);
                        break;
                    }
                }
                map = netmap::compute_from(&snapshot, device);
            }
            let Some(m) = map else {
                let _ = tx
                    .send(line(&ErrorBody {
                        error: "revoked".into(),
                    }))
                    .await;
                tracing::info!(event = "map_stream_closed", device, reason = "revoked");
                return;
            };
            last_snapshot = Some(snapshot);
            let mut m = m;
            if let Some(issuer) = &api.relays {
                if refresh {
                    relays = issuer.relays_for(
                        org_id,
                        &m.node.public_key,
                        super::relay_tokens::unix_now(),
                    );
                    relays_due = tokio::time::Instant::now()
                        + (super::relay_tokens::TOKEN_TTL - super::relay_tokens::REFRESH_BEFORE);
                }
                m.relays.clone_from(&relays);
            }
            let bytes = line(&m);
            let content = content_hash(&bytes);
            if last != Some(content) {
                tracing::debug!(
                    event = "map_pushed",
                    device,
                    serial = m.serial,
                    peers = m.peers.len()
                );
                if tx.send(bytes).await.is_err() {
                    break;
                }
                last = Some(content);
            }
        }
        tokio::select! {
            _ = shutdown.wait() => break,
            changed = serial.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(KEEPALIVE) => {
                if tx.send(Bytes::from_static(b"\n")).await.is_err() {
                    break;
                }
            }
            _ = tx.closed() => break,
            _ = tokio::time::sleep_until(relays_due), if api.relays.is_some() => {}
            Some(message) = inbox.recv() => {
                // The snapshot is unchanged, so the loop's top costs a
                // pointer compare.
                if tx.send(message).await.is_err() {
                    break;
                }
            }
        }
    }
    tracing::info!(event = "map_stream_closed", device, reason = "ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_per_address_and_peeking_counts_nothing() {
        let table = Mutex::new(HashMap::new());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for n in 1..=3 {
            assert_eq!(count(&table, a, false), n);
        }
        assert_eq!(count(&table, a, true), 3);
        assert_eq!(count(&table, b, true), 0);
        assert_eq!(count(&table, b, false), 1);
    }
}
