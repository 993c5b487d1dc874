//! Prometheus metrics (`metrics-bind-address`): what the Server and the
//! Client instance count, and the small HTTP listener serving them at
//! `/metrics` in the Prometheus/OpenMetrics text format.
//!
//! Labels come only from the configuration: a Tunnel is named by its first
//! Public hostname, a Service by its first Public hostname (or
//! `catch-all`), and reasons are fixed tokens. Nothing a Visitor sends (an
//! SNI, an address) ever becomes a label, so the number of series is
//! bounded by the config.

pub mod http;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

use crate::config::{ServiceConfig, TunnelConfig};
// Re-exported for `client/`, which names it here until it adopts `crate::sync`.
pub(crate) use crate::sync::AbortOnDrop;
use crate::sync::{lock, read, write};

/// A label set: fixed keys, values from the config or fixed tokens.
pub(crate) type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The metric of `labels` in `family`. (The guard `get_or_create`
/// returns must be gone before the family is used again.)
fn get<M: Clone, C: prometheus_client::metrics::family::MetricConstructor<M>>(
    family: &Family<Labels, M, C>,
    labels: &Labels,
) -> M {
    family.get_or_create(labels).clone()
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The name a Tunnel has in metrics and status: its first Public hostname.
pub(crate) fn tunnel_name(t: &TunnelConfig) -> String {
    t.public_hostnames
        .first()
        .map(|h| h.to_string())
        .unwrap_or_else(|| format!("tunnel-{}", t.index))
}

/// The name a Service has in metrics and status: its first Public
/// hostname, or `catch-all`.
pub(crate) fn service_name(s: &ServiceConfig) -> String {
    s.public_hostnames
        .first()
        .map(|h| h.to_string())
        .unwrap_or_else(|| "catch-all".to_string())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Registers metrics and hands back the handles that update them.
struct Registrar<'a>(&'a mut Registry);

impl Registrar<'_> {
    /// Register `metric` as `name`, described by `help`.
    fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    /// Register a new (zero) counter, gauge or family as `name`.
    fn metric<M: Metric + Clone + Default>(&mut self, name: &str, help: &str) -> M {
        self.add(name, help, M::default())
    }
}

/// Process start time and build information, common to both roles.
fn register_process(registry: &mut Registry, role: &str) {
    let start = FloatGauge::default();
    start.set(unix_now());
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        start,
    );
    registry.register(
        "build",
        "Build information (always 1)",
        Info::new(labels(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("role", role),
        ])),
    );
}

/// Seconds buckets from 1 ms to ~16 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// The per-Tunnel families, to add Tunnels to on reload.
#[derive(Debug)]
struct TunnelFamilies {
    streams: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    connected: Family<Labels, Gauge>,
}

impl TunnelFamilies {
    fn create(&self, t: &TunnelConfig) -> TunnelMetrics {
        let name = tunnel_name(t);
        let l = labels(&[("tunnel", &name)]);
        let with = |k, v: &str| labels(&[("tunnel", &name), (k, v)]);
        TunnelMetrics {
            streams: get(&self.streams, &l),
            streams_active: get(&self.active, &l),
            bytes_to_client: get(&self.bytes, &with("direction", "to_client")),
            bytes_to_visitor: get(&self.bytes, &with("direction", "to_visitor")),
            connected: get(&self.connected, &l),
            connections: get(&self.connections, &with("event", "connected")),
            replaced: get(&self.connections, &with("event", "replaced")),
            name,
        }
    }
}

/// The counters of one Tunnel.
#[derive(Debug, Clone, Default)]
pub struct TunnelMetrics {
    /// The Tunnel's label (its first Public hostname).
    pub name: String,
    /// Visitor streams routed to it.
    pub streams: Counter,
    pub(crate) streams_active: Gauge,
    pub(crate) bytes_to_client: Counter,
    /// Bytes relayed from the Tunnel to Visitors.
    pub bytes_to_visitor: Counter,
    /// 1 while a Tunnel connection is active, else 0.
    pub connected: Gauge,
    /// Tunnel connections installed.
    pub connections: Counter,
    /// Tunnel connections replaced by a newer one.
    pub replaced: Counter,
}

/// What the Server counts.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    pub(crate) visitors_accepted: Counter,
    visitors_dropped: Family<Labels, Counter>,
    families: TunnelFamilies,
    /// By slot (see [`crate::server::tunnels`]).
    tunnels: std::sync::RwLock<Vec<TunnelMetrics>>,
    tunnels_refused: Family<Labels, Counter>,
    pub(crate) handshake_duration: Histogram,
    admission_refused: Family<Labels, Counter>,
    admission_saturated: Family<Labels, Gauge>,
    certificate_expiry: Family<Labels, Gauge>,
    /// (hostname, notAfter) as set, for status.
    certificates: Mutex<Vec<(String, i64)>>,
}

impl ServerMetrics {
    /// Counters for `tunnels`, registered under the `runewarp` prefix.
    pub fn new(tunnels: &[TunnelConfig]) -> Self {
        let mut registry = Registry::with_prefix("runewarp");
        register_process(&mut registry, "server");
        let mut r = Registrar(&mut registry);
        let visitors_accepted: Counter = r.metric(
            "visitors_accepted",
            "Visitor TCP connections accepted by the public listener",
        );
        let visitors_dropped: Family<Labels, Counter> = r.metric(
            "visitors_dropped",
            "Visitors dropped before reaching a Tunnel, by reason",
        );
        let families = TunnelFamilies {
            streams: r.metric("tunnel_streams", "Visitor streams routed through a Tunnel"),
            bytes: r.metric(
                "tunnel_bytes",
                "Bytes relayed through a Tunnel (counted when a stream ends), by direction",
            ),
            connections: r.metric(
                "tunnel_connections",
                "Tunnel connection events (connected, replaced) per Tunnel",
            ),
            active: r.metric(
                "tunnel_streams_active",
                "Visitor streams in flight per Tunnel",
            ),
            connected: r.metric(
                "tunnel_connected",
                "Whether the Tunnel has an active Client connection (1) or not (0)",
            ),
        };
        let tunnels = tunnels.iter().map(|t| families.create(t)).collect();
        let tunnels_refused: Family<Labels, Counter> = r.metric(
            "tunnel_handshakes_refused",
            "QUIC connections from would-be Clients that did not become a Tunnel connection, by reason",
        );
        let handshake_duration = r.add(
            "tunnel_handshake_duration_seconds",
            "Duration of completed QUIC handshakes with Client instances",
            Histogram::new(latency_buckets()),
        );
        let admission_refused: Family<Labels, Counter> = r.metric(
            "admission_refused",
            "Work refused by an admission limit, by scope",
        );
        let admission_saturated: Family<Labels, Gauge> = r.metric(
            "admission_saturated",
            "Whether an admission scope refused work in the last check (1) or not (0)",
        );
        let certificate_expiry: Family<Labels, Gauge> = r.metric(
            "certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of a certificate this process presents, since the Unix epoch",
        );
        Self {
            registry,
            visitors_accepted,
            visitors_dropped,
            families,
            tunnels: std::sync::RwLock::new(tunnels),
            tunnels_refused,
            handshake_duration,
            admission_refused,
            admission_saturated,
            certificate_expiry,
            certificates: Mutex::new(Vec::new()),
        }
    }

    /// Visitors dropped for `reason` so far.
    pub fn dropped(&self, reason: &'static str) -> u64 {
        get(&self.visitors_dropped, &labels(&[("reason", reason)])).get()
    }

    /// Certificates and their notAfter (Unix seconds), for status.
    pub fn certificates(&self) -> Vec<(String, i64)> {
        lock(&self.certificates).clone()
    }

    /// The counters of the Tunnel in `slot`.
    pub fn tunnel(&self, slot: usize) -> Option<TunnelMetrics> {
        read(&self.tunnels).get(slot).cloned()
    }

    /// Count the Tunnel `t` in `slot` from now on (after a reload): a new
    /// slot gets new series; a renamed Tunnel (new first hostname) too.
    pub(crate) fn ensure_tunnel(&self, slot: usize, t: &TunnelConfig) {
        let mut tunnels = write(&self.tunnels);
        match tunnels.get(slot) {
            Some(m) if m.name == tunnel_name(t) => {}
            Some(_) => tunnels[slot] = self.families.create(t),
            None if slot == tunnels.len() => tunnels.push(self.families.create(t)),
            None => {}
        }
    }

    /// `reason` is one of the fixed drop tokens.
    pub(crate) fn visitor_dropped(&self, reason: &'static str) {
        self.visitors_dropped
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// Count a refused Tunnel connection; `reason` is a fixed token.
    pub fn tunnel_refused(&self, reason: &'static str) {
        self.tunnels_refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    pub(crate) fn admission_refused(&self, scope: &'static str) {
        self.admission_refused
            .get_or_create(&labels(&[("scope", scope)]))
            .inc();
    }

    pub(crate) fn admission_saturated(&self, scope: &'static str, saturated: bool) {
        self.admission_saturated
            .get_or_create(&labels(&[("scope", scope)]))
            .set(i64::from(saturated));
    }

    /// `hostname` is a configured name (the Server hostname).
    pub(crate) fn certificate_expiry(&self, hostname: &str, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&labels(&[("hostname", hostname)]))
            .set(not_after);
        remember(&self.certificates, hostname, not_after);
    }

    pub(crate) fn render(&self) -> String {
        render(&self.registry)
    }
}

/// The counters of one Service.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// Streams handed to the Service.
    pub streams: Counter,
    pub(crate) streams_active: Gauge,
    pub(crate) bytes_to_backend: Counter,
    /// Bytes relayed from the Local backend to Visitors.
    pub bytes_from_backend: Counter,
    pub(crate) backend_connect: Histogram,
    /// All backend failures (for status; the exposition has them by reason).
    pub(crate) backend_failures: Counter,
    name: String,
    failures: Family<Labels, Counter>,
}

impl ServiceMetrics {
    /// `reason`: `backend_unreachable` or `backend_timeout`.
    pub(crate) fn backend_failed(&self, reason: &'static str) {
        self.backend_failures.inc();
        self.failures
            .get_or_create(&labels(&[("service", &self.name), ("reason", reason)]))
            .inc();
    }
}

/// The per-Service families; a Service's counters are found by its name.
#[derive(Debug)]
struct ServiceFamilies {
    streams: Family<Labels, Counter>,
    active: Family<Labels, Gauge>,
    bytes: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl ServiceFamilies {
    fn create(&self, s: &ServiceConfig) -> ServiceMetrics {
        let name = service_name(s);
        let l = labels(&[("service", &name)]);
        let with = |k, v: &str| labels(&[("service", &name), (k, v)]);
        let unreachable = get(&self.failures, &with("reason", "backend_unreachable")).get();
        let timeout = get(&self.failures, &with("reason", "backend_timeout")).get();
        let failures_total = unreachable + timeout;
        let backend_failures = Counter::default();
        backend_failures.inc_by(failures_total);
        ServiceMetrics {
            streams: get(&self.streams, &l),
            streams_active: get(&self.active, &l),
            bytes_to_backend: get(&self.bytes, &with("direction", "to_backend")),
            bytes_from_backend: get(&self.bytes, &with("direction", "from_backend")),
            backend_connect: get(&self.latency, &l),
            backend_failures,
            failures: self.failures.clone(),
            name,
        }
    }
}

/// What a Client instance counts.
#[derive(Debug)]
pub struct ClientMetrics {
    registry: Registry,
    services: ServiceFamilies,
    /// 1 while the Tunnel connection is up, else 0.
    pub tunnel_connected: Gauge,
    pub(crate) tunnel_connections: Counter,
    tunnel_rtt: FloatGauge,
    dial_failures: Family<Labels, Counter>,
    streams_rejected: Family<Labels, Counter>,
    certificate_expiry: Family<Labels, Gauge>,
    /// The current Tunnel connection, for its round-trip time.
    connection: Mutex<Option<quinn::Connection>>,
    connected_since: Mutex<Option<SystemTime>>,
    waiting: Mutex<Option<Waiting>>,
    certificates: Mutex<Vec<(String, i64)>>,
}

/// Why a Client instance is not connected, and when it tries again.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// A fixed token (`refused`, `timeout`, `replaced`, `lost`...).
    pub reason: &'static str,
    /// The error behind `reason`, for people.
    pub detail: String,
    pub(crate) retry_at: SystemTime,
}

impl ClientMetrics {
    /// Counters for `services`, registered under the `runewarp_client` prefix.
    pub fn new(services: &[ServiceConfig]) -> Self {
        let mut registry = Registry::with_prefix("runewarp_client");
        register_process(&mut registry, "client");
        let mut r = Registrar(&mut registry);
        let streams: Family<Labels, Counter> =
            r.metric("service_streams", "Visitor streams handed to a Service");
        let active: Family<Labels, Gauge> = r.metric(
            "service_streams_active",
            "Visitor streams in flight per Service",
        );
        let bytes: Family<Labels, Counter> = r.metric(
            "service_bytes",
            "Bytes relayed for a Service (counted when a stream ends), by direction",
        );
        let failures: Family<Labels, Counter> = r.metric(
            "backend_connect_failures",
            "Failed connections to a Service's Local backend, by reason",
        );
        let latency = r.add(
            "backend_connect_duration_seconds",
            "Time to connect to a Service's Local backend",
            Family::<Labels, Histogram>::new_with_constructor(
                (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
            ),
        );
        let service_families = ServiceFamilies {
            streams,
            active,
            bytes,
            failures,
            latency,
        };
        for s in services {
            service_families.create(s);
        }
        let tunnel_connected: Gauge = r.metric(
            "tunnel_connected",
            "Whether the Tunnel connection to the Server is up (1) or not (0)",
        );
        let tunnel_connections: Counter = r.metric(
            "tunnel_connections",
            "Tunnel connections established (the first one and every reconnect)",
        );
        let tunnel_rtt: FloatGauge = r.metric(
            "tunnel_rtt_seconds",
            "Round-trip time of the Tunnel connection as QUIC estimates it",
        );
        let dial_failures: Family<Labels, Counter> = r.metric(
            "tunnel_dial_failures",
            "Failed attempts to connect to the Server, by reason",
        );
        let streams_rejected: Family<Labels, Counter> = r.metric(
            "streams_rejected",
            "Streams from the Server that reached no Service, by reason",
        );
        let certificate_expiry: Family<Labels, Gauge> = r.metric(
            "certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of a terminate certificate, per configured hostname, since the Unix epoch",
        );
        Self {
            registry,
            services: service_families,
            tunnel_connected,
            tunnel_connections,
            tunnel_rtt,
            dial_failures,
            streams_rejected,
            certificate_expiry,
            connection: Mutex::new(None),
            connected_since: Mutex::new(None),
            waiting: Mutex::new(None),
            certificates: Mutex::new(Vec::new()),
        }
    }

    /// The counters of Service `s` (by its name, so they survive a reload
    /// that moves it in the file).
    pub fn service(&self, s: &ServiceConfig) -> Option<ServiceMetrics> {
        Some(self.services.create(s))
    }

    /// The Tunnel connection is up (`Some`) or down (`None`).
    pub(crate) fn set_connection(&self, conn: Option<quinn::Connection>) {
        self.tunnel_connected.set(i64::from(conn.is_some()));
        if conn.is_some() {
            self.tunnel_connections.inc();
            *lock(&self.waiting) = None;
            *lock(&self.connected_since) = Some(SystemTime::now());
        } else {
            self.tunnel_rtt.set(0.0);
            *lock(&self.connected_since) = None;
        }
        *lock(&self.connection) = conn;
    }

    /// The current round-trip time estimate, if connected.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        lock(&self.connection).as_ref().map(|c| c.rtt())
    }

    /// The Tunnel connection's path as QUIC sees it, if connected: what
    /// `client status` shows to explain a slow Tunnel.
    pub(crate) fn path(&self) -> Option<quinn::PathStats> {
        lock(&self.connection).as_ref().map(|c| c.stats().path)
    }

    /// `reason` is a fixed dial-error token.
    pub(crate) fn dial_failed(&self, reason: &'static str) {
        self.dial_failures
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// `reason` is a fixed token (`no_service`, `bad_framing`...).
    pub(crate) fn stream_rejected(&self, reason: &'static str) {
        self.streams_rejected
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// `hostname` is a configured Public hostname.
    pub(crate) fn certificate_expiry(&self, hostname: &str, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&labels(&[("hostname", hostname)]))
            .set(not_after);
        remember(&self.certificates, hostname, not_after);
    }

    /// Certificates and their notAfter (Unix seconds), for status.
    pub fn certificates(&self) -> Vec<(String, i64)> {
        lock(&self.certificates).clone()
    }

    /// When the current Tunnel connection came up, if it is up.
    pub(crate) fn connected_since(&self) -> Option<SystemTime> {
        *lock(&self.connected_since)
    }

    /// The remote address of the current Tunnel connection.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        lock(&self.connection).as_ref().map(|c| {
            let a = c.remote_address();
            std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
        })
    }

    /// What the Client waits for while not connected.
    pub fn waiting(&self) -> Option<Waiting> {
        lock(&self.waiting).clone()
    }

    /// Not connected: record why and until when.
    pub(crate) fn set_waiting(&self, reason: &'static str, detail: String, retry_in: Duration) {
        *lock(&self.waiting) = Some(Waiting {
            reason,
            detail,
            retry_at: SystemTime::now() + retry_in,
        });
    }

    pub(crate) fn render(&self) -> String {
        if let Some(rtt) = self.rtt() {
            self.tunnel_rtt.set(rtt.as_secs_f64());
        }
        render(&self.registry)
    }
}

fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The notAfter of a DER certificate, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Counts one stream in a gauge until dropped.
#[derive(Debug)]
pub(crate) struct ActiveStream(Gauge);

impl ActiveStream {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Count `duration` since `started` into `histogram`.
pub(crate) fn observe_since(histogram: &Histogram, started: std::time::Instant) {
    histogram.observe(started.elapsed().as_secs_f64());
}

/// Serve `metrics` on `listener` until the task is aborted.
pub(crate) fn spawn_listener(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(http::serve(listener, render))
}

fn remember(list: &Mutex<Vec<(String, i64)>>, hostname: &str, not_after: i64) {
    let mut list = lock(list);
    list.retain(|(h, _)| h != hostname);
    list.push((hostname.to_string(), not_after));
}

/// Bind `addr` for `/metrics` (before the runtime serves it).
pub fn bind(
    addr: std::net::SocketAddr,
) -> Result<std::net::TcpListener, (std::net::SocketAddr, std::io::Error)> {
    let bind = || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    bind().map_err(|e| (addr, e))
}

/// [`spawn_listener`] for a listener bound with [`bind`].
pub(crate) fn spawn_std_listener(
    listener: std::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Option<AbortOnDrop> {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => Some(AbortOnDrop::new(spawn_listener(l, render))),
        Err(error) => {
            tracing::warn!(event = "metrics_listener_failed", error = ?error.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostname::PublicHostname;

    #[test]
    fn tunnels_are_named_by_their_first_hostname_and_counted_apart() {
        let t = |i, h: &str| TunnelConfig {
            index: i,
            public_hostnames: vec![PublicHostname::parse(h).unwrap()],
            client_identities: vec![],
        };
        let m = ServerMetrics::new(&[t(0, "a.example.com"), t(1, "b.example.com")]);
        m.tunnel(1).unwrap().streams.inc();
        m.visitor_dropped("unknown_hostname");
        let text = m.render();
        for expected in [
            "runewarp_tunnel_streams_total{tunnel=\"b.example.com\"} 1",
            "runewarp_tunnel_streams_total{tunnel=\"a.example.com\"} 0",
            "runewarp_visitors_dropped_total{reason=\"unknown_hostname\"} 1",
            "runewarp_build_info{",
            "role=\"server\"",
            "runewarp_process_start_time_seconds ",
        ] {
            assert!(text.contains(expected), "{expected:?} in {text}");
        }
    }

    #[test]
    fn every_metric_the_grafana_dashboard_queries_exists() {
        let dashboard = include_str!("../../contrib/grafana-dashboard.json");
        let service = ServiceConfig {
            index: 0,
            public_hostnames: vec![],
            backend_address: crate::config::BackendAddress {
                host: "127.0.0.1".into(),
                port: 1,
            },
            tls_mode: crate::config::TlsMode::Passthrough,
            proxy_protocol: false,
        };
        let tunnel = TunnelConfig {
            index: 0,
            public_hostnames: vec![PublicHostname::parse("a.example.com").unwrap()],
            client_identities: vec![],
        };
        let server = ServerMetrics::new(std::slice::from_ref(&tunnel));
        server.visitor_dropped("no_sni");
        server.tunnel_refused("overloaded");
        server.admission_refused("routed_streams");
        server.admission_saturated("routed_streams", false);
        server.certificate_expiry("edge.example.com", 1);
        let client = ClientMetrics::new(std::slice::from_ref(&service));
        client.dial_failed("timeout");
        client.stream_rejected("no_service");
        client
            .service(&service)
            .unwrap()
            .backend_failed("backend_timeout");
        assert!(client.render().contains("service=\"catch-all\""));
        let exposed = server.render() + &client.render();
        let names: std::collections::BTreeSet<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("runewarp_") && w.len() > "runewarp_".len())
            .collect();
        assert!(names.len() > 10, "{names:?}");
        for name in names {
            assert!(
                exposed.contains(&format!("\n{name}{{")) || exposed.contains(&format!("\n{name} ")),
                "the dashboard queries {name}, which is not exposed"
            );
        }
    }
}
