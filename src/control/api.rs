//! The control API (HTTP/1.1 + JSON over TLS; see docs/control-api.md):
//! `POST /v1/register` enrols a device with a setup key, `GET /v1/map`
//! streams its network map as JSON lines, one per change; `POST
//! /v1/signal` forwards a sealed message to a peer; `POST /v1/endpoints`
//! records where a device's data plane can be reached.

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

use super::netmap;
use super::netmap::OrgSnapshot;
use super::store::Device;
use super::store::{RegisterError, Store, StoreError};
use crate::mesh_protocol::{
    EndpointsRequest, ErrorBody, MAX_ENDPOINTS, MAX_SIGNAL, RegisterRequest, RegisterResponse,
    SignalEnvelope, SignalLine, SignalRequest, valid_endpoint, valid_hostname, valid_public_key,
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
}

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

impl Api {
    pub fn new(
        store: Arc<Mutex<Store>>,
        serial: tokio::sync::watch::Receiver<u64>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            serial,
            shutdown,
            registrations: Mutex::new(HashMap::new()),
            map_refusals: Mutex::new(HashMap::new()),
            signals_sent: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(0),
            snapshots: Mutex::new(HashMap::new()),
        }
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
            (&Method::POST, "/v1/endpoints") => self.endpoints(peer, req).await,
            (_, "/v1/register" | "/v1/map" | "/v1/signal" | "/v1/endpoints") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    async fn register(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        if !self.admit(peer.ip().to_canonical()) {
            if let Some(suppressed) = crate::logging::budget::REGISTER_REFUSED.allow() {
                tracing::warn!(event = "register_rate_limited", peer = %peer, suppressed);
            }
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many registrations; wait a minute",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 4 KiB"),
        };
        let r: RegisterRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
        };
        if !valid_public_key(&r.public_key) {
            return error(
                StatusCode::BAD_REQUEST,
                "public_key must be a base64 X25519 key (32 bytes)",
            );
        }
        if !valid_hostname(&r.hostname) {
            return error(
                StatusCode::BAD_REQUEST,
                "hostname must be one DNS label: a-z, 0-9 and '-', at most 63",
            );
        }
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
        match self.store().device_by_token(token) {
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
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 4 KiB"),
        };
        let r: SignalRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
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
        let device = match self.authenticate(peer, &req) {
            Ok(d) => d,
            Err(answer) => return *answer,
        };
        if count(&self.signals_sent, device.id, false) > SIGNAL_RATE {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests; wait a minute",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 4 KiB"),
        };
        let r: EndpointsRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
        };
        if r.endpoints.len() > MAX_ENDPOINTS || !r.endpoints.iter().all(|e| valid_endpoint(e)) {
            return error(
                StatusCode::BAD_REQUEST,
                "endpoints must be at most 16 IP:PORT addresses",
            );
        }
        let result = self.store().set_endpoints(device.id, &r.endpoints);
        match result {
            Ok(changed) => {
                tracing::info!(
                    event = "endpoints_stored",
                    device = device.id,
                    count = r.endpoints.len(),
                    changed
                );
                json(
                    StatusCode::OK,
                    &serde_json::json!({"stored": r.endpoints.len()}),
                )
            }
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                error(StatusCode::INTERNAL_SERVER_ERROR, "storage error")
            }
        }
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
    loop {
        serial.borrow_and_update();
        let mut snapshot = match api.snapshot(org_id, false) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(event = "store_failed", error = %e);
                break;
            }
        };
        // The same snapshot as last time: nothing in this organisation
        // changed, nothing to compute.
        if !last_snapshot
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
