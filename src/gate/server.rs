//! The gate's HTTP side: hyper 1.x server, the sign-in flow, and the
//! hand-off of authenticated requests to [`super::proxy`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::config::{GATE_PATH_PREFIX, GateConfig};
use super::mail::Mailer;
use super::pages;
use super::proxy;
use super::ratelimit::RateLimiter;
use super::sessions::{Session, SessionStore};
use super::tokens;
use crate::shutdown::Shutdown;

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// Wrong codes allowed per sign-in request.
pub const CODE_TRIES: u8 = 5;
/// Pending sign-in requests kept at most (oldest dropped beyond).
const MAX_PENDING: usize = 10_000;
/// Largest form body the gate reads.
const MAX_FORM: usize = 8 * 1024;
/// Connections served at once; beyond, accepting pauses.
pub const MAX_CONNECTIONS: usize = 4096;
/// How often ended sessions are deleted from the store.
const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Name of the browser-binding cookie (always host-only).
pub const STATE_COOKIE: &str = "__Host-runegate-state";

const SIGN_IN: &str = "/_runewarp/gate/sign-in";
const CODE: &str = "/_runewarp/gate/code";
const LINK: &str = "/_runewarp/gate/link";
const LOGOUT: &str = "/_runewarp/gate/logout";

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot listen on gate.listen-address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] super::sessions::StoreError),
    #[error(transparent)]
    Mail(#[from] super::mail::MailError),
}

struct Pending {
    email: String,
    token_digest: String,
    code_digest: String,
    expires: Instant,
    tries_left: u8,
    next: String,
}

struct Limits {
    sign_in_ip: RateLimiter,
    sign_in_address: RateLimiter,
    code_ip: RateLimiter,
}

pub struct Gate {
    config: GateConfig,
    /// Who may sign in: `config.allowed` at start, replaced by a reload.
    allowed: std::sync::RwLock<super::config::AllowList>,
    store: SessionStore,
    csrf_key: Vec<u8>,
    mailer: Arc<Mailer>,
    /// Keyed by the digest of the browser's state cookie.
    pending: Mutex<HashMap<String, Pending>>,
    limits: Limits,
    session_cookie: String,
}

/// A started gate: the listener is bound, the store open.
pub struct Started {
    gate: Arc<Gate>,
    listener: TcpListener,
}

/// Open the store (revoking sessions of addresses no longer allowed), read
/// the SMTP password, bind the listener.
pub async fn start(config: GateConfig) -> Result<Started, GateError> {
    let listen_address = config.listen_address;
    let (upstream, base_url) = (config.upstream.to_string(), config.base_url.to_string());
    let gate = Gate::open(config)?;
    let listener = TcpListener::bind(listen_address)
        .await
        .map_err(|source| GateError::Bind {
            addr: listen_address,
            source,
        })?;
    tracing::info!(
        event = "gate_listening",
        address = %listen_address,
        upstream,
        base_url,
    );
    Ok(Started { gate, listener })
}

impl Gate {
    /// The gate without a listener: open the store (revoking sessions of
    /// addresses no longer allowed) and read the SMTP password. Connections
    /// come through [`Gate::serve_connection`] (a Client's terminate
    /// Service) or [`run`] (standalone).
    pub fn open(config: GateConfig) -> Result<Arc<Gate>, GateError> {
        let sign_in = &config.sign_in;
        let store = SessionStore::open(
            &sign_in.state_dir,
            sign_in.session_ttl,
            sign_in.session_idle,
        )?;
        let allowed = sign_in.allowed.clone();
        let revoked = store.sweep(|email| {
            super::config::EmailAddress::parse(email)
                .map(|e| allowed.allows(&e))
                .unwrap_or(false)
        })?;
        if revoked > 0 {
            tracing::info!(
                event = "gate_sessions_revoked",
                count = revoked,
                reason = "not_allowed"
            );
        }
        let csrf_key = store.csrf_key()?;
        let mailer = Arc::new(Mailer::new(&config.smtp)?);
        let session_cookie = match sign_in.cookie_domain {
            Some(_) => "__Secure-runegate",
            None => "__Host-runegate",
        }
        .to_string();
        Ok(Arc::new(Gate {
            allowed: std::sync::RwLock::new(allowed),
            config,
            store,
            csrf_key,
            mailer,
            pending: Mutex::new(HashMap::new()),
            limits: Limits {
                sign_in_ip: RateLimiter::new(10, Duration::from_secs(60)),
                sign_in_address: RateLimiter::new(3, Duration::from_secs(300)),
                code_ip: RateLimiter::new(20, Duration::from_secs(10)),
            },
            session_cookie,
        }))
    }

    /// Serve HTTP/1.1 on one connection whose Visitor is `peer` until it
    /// closes. Upgrades (WebSockets) are spliced once the app agrees.
    pub async fn serve_connection<I>(self: Arc<Self>, io: I, peer: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req| {
            let gate = self.clone();
            async move { Ok::<_, Infallible>(gate.handle(req, peer).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
    }

    /// The configuration it started with.
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// The allow-list in force.
    pub fn allowed(&self) -> super::config::AllowList {
        self.allowed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the allow-list (a reload): sessions and pending sign-ins of
    /// addresses no longer allowed end now. Returns the sessions revoked.
    pub fn set_allowed(
        &self,
        allowed: super::config::AllowList,
    ) -> Result<usize, super::sessions::StoreError> {
        *self.allowed.write().unwrap_or_else(|p| p.into_inner()) = allowed.clone();
        self.lock_pending().retain(|_, p| {
            super::config::EmailAddress::parse(&p.email)
                .map(|e| allowed.allows(&e))
                .unwrap_or(false)
        });
        let revoked = sweep(&self.store, &allowed)?;
        if revoked > 0 {
            tracing::info!(
                event = "gate_sessions_revoked",
                count = revoked,
                reason = "not_allowed"
            );
        }
        Ok(revoked)
    }

    /// Delete ended sessions every [`SWEEP_EVERY`] while the gate lives.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(sweep_every(Arc::downgrade(self), SWEEP_EVERY))
    }
}

/// Accept connections until shutdown.
pub async fn run(started: Started, mut shutdown: Shutdown) {
    let Started { gate, listener } = started;
    let sweeper = gate.spawn_sweeper();
    let reloader = tokio::spawn(reload_on_sighup(gate.clone()));
    crate::notify::notify(crate::notify::READY);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's
        // queue instead of costing memory here.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            () = shutdown.wait() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(event = "gate_accept_failed", error = %e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let _slot = slot;
            gate.serve_connection(stream, peer).await;
        });
    }
    crate::notify::notify(crate::notify::STOPPING);
    sweeper.abort();
    reloader.abort();
    tracing::info!(event = "gate_stopped");
}

/// SIGHUP: read the config file again and apply the new allow-lists
/// (sessions of removed addresses end at once). Other changed keys are named
/// in a warning and keep their values until a restart; an invalid file
/// changes nothing.
async fn reload_on_sighup(gate: Arc<Gate>) {
    crate::shutdown::on_each_sighup(|| reload(&gate)).await;
}

fn reload(gate: &Gate) {
    let Some(path) = gate.config.source.clone() else {
        return;
    };
    let env = crate::config::Environment::from_process();
    let new = match crate::config::load_gate(Some(&path), &env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = "reload_failed", error = %e, hint = "nothing was changed; fix it and send SIGHUP again");
            return;
        }
    };
    let mut unchanged = new.clone();
    unchanged.sign_in.allowed = gate.config.sign_in.allowed.clone();
    if unchanged != gate.config {
        tracing::warn!(
            event = "reload_restart_needed",
            hint = "only allowed-emails and allowed-domains apply on reload; the other changed keys keep their running values until a restart"
        );
    }
    match gate.set_allowed(new.sign_in.allowed) {
        Ok(revoked) => tracing::info!(event = "gate_reloaded", revoked),
        Err(e) => tracing::error!(event = "gate_store_failed", error = %e),
    }
}

/// Delete ended sessions and those of addresses `allowed` does not list.
fn sweep(
    store: &SessionStore,
    allowed: &super::config::AllowList,
) -> Result<usize, super::sessions::StoreError> {
    store.sweep(|email| {
        super::config::EmailAddress::parse(email)
            .map(|e| allowed.allows(&e))
            .unwrap_or(false)
    })
}

async fn sweep_every(gate: std::sync::Weak<Gate>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(gate) = gate.upgrade() else { return };
        if let Err(e) = sweep(&gate.store, &gate.allowed()) {
            tracing::error!(event = "gate_store_failed", error = %e);
        }
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(pages::CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn add_cookie(r: &mut Response<Body>, cookie: String) {
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The value of cookie `name` in the request, if sent.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A same-origin path to return to after sign-in; anything else is `/`.
pub fn safe_next(next: &str) -> String {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.starts_with(GATE_PATH_PREFIX)
        && next.len() <= 2048
        && next.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        next.to_string()
    } else {
        "/".to_string()
    }
}

async fn read_form(req: Request<Incoming>) -> Option<HashMap<String, String>> {
    let body = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .ok()?;
    Some(
        form_urlencoded::parse(&body.to_bytes())
            .into_owned()
            .collect(),
    )
}

impl Gate {
    /// The Visitor's address: the peer, or for a trusted proxy the
    /// right-most `X-Forwarded-For` entry that is not itself trusted.
    fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let trusted = |ip: IpAddr| self.config.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        let chain: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        chain
            .into_iter()
            .rev()
            .find(|ip| !trusted(*ip))
            .unwrap_or(peer)
    }

    fn session_cookie_header(&self, value: &str, max_age: u64) -> String {
        let domain = self
            .config
            .sign_in
            .cookie_domain
            .as_ref()
            .map(|d| format!("; Domain={d}"))
            .unwrap_or_default();
        format!(
            "{}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}{domain}",
            self.session_cookie
        )
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let secret = cookie(headers, &self.session_cookie)?;
        match self.store.lookup(secret) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(event = "gate_store_failed", error = %e);
                None
            }
        }
    }

    /// The browser id from the state cookie, or a new one to set.
    fn browser(&self, headers: &HeaderMap) -> (String, bool) {
        match cookie(headers, STATE_COOKIE).filter(|v| tokens::looks_like_secret(v)) {
            Some(b) => (b.to_string(), false),
            None => (tokens::new_secret(), true),
        }
    }

    fn with_browser(&self, mut r: Response<Body>, browser: &str, new: bool) -> Response<Body> {
        if new {
            add_cookie(
                &mut r,
                format!("{STATE_COOKIE}={browser}; Path=/; Secure; HttpOnly; SameSite=Lax"),
            );
        }
        r
    }

    fn sign_in_page(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        next: &str,
        note: Option<&str>,
    ) -> Response<Body> {
        let (browser, new) = self.browser(headers);
        let csrf = tokens::csrf_token(&self.csrf_key, "sign-in", &browser);
        let page = pages::sign_in(SIGN_IN, &csrf, &safe_next(next), note);
        self.with_browser(html(status, page), &browser, new)
    }

    fn message(&self, status: StatusCode, title: &str, text: &str) -> Response<Body> {
        html(status, pages::message(title, text, SIGN_IN))
    }

    /// `Some(429 page)` when `limiter` refuses one more `what` for `key`
    /// (logged with the kind of key, never the key itself).
    fn limited(
        &self,
        limiter: &RateLimiter,
        key: &str,
        what: &'static str,
        key_kind: &'static str,
        ip: IpAddr,
    ) -> Option<Response<Body>> {
        if limiter.allow(key) {
            return None;
        }
        tracing::warn!(event = "gate_rate_limited", what, key = key_kind, ip = %ip);
        Some(self.too_many())
    }

    /// 410 for an expired sign-in request: `title`, and `what` has expired.
    fn expired(&self, title: &str, what: &str) -> Response<Body> {
        let text = format!("{what} has expired. Request a new sign-in mail.");
        self.message(StatusCode::GONE, title, &text)
    }

    fn too_many(&self) -> Response<Body> {
        let mut r = self.message(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            "Too many sign-in attempts. Wait a few minutes, then try again.",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("300"));
        r
    }

    /// A POST from another origin (when the browser says so) is refused.
    fn cross_origin(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            Some(origin) => origin != self.config.base_url.to_string(),
            None => false,
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let ip = self.client_ip(req.headers(), peer.ip());
        let path = req.uri().path().to_string();
        if path.starts_with(GATE_PATH_PREFIX) || path == GATE_PATH_PREFIX.trim_end_matches('/') {
            return self.gate_route(req, &path, ip).await;
        }
        match self.session(req.headers()) {
            Some(session) => {
                proxy::forward(&self.config, req, &session, ip, &self.session_cookie).await
            }
            None => {
                let next = if req.method() == Method::GET {
                    req.uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "/".to_string())
                } else {
                    "/".to_string()
                };
                self.sign_in_page(req.headers(), StatusCode::UNAUTHORIZED, &next, None)
            }
        }
    }

    async fn gate_route(&self, req: Request<Incoming>, path: &str, ip: IpAddr) -> Response<Body> {
        let method = req.method().clone();
        if method == Method::POST && self.cross_origin(req.headers()) {
            return self.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form was sent from another site.",
            );
        }
        match (method, path) {
            (Method::GET | Method::HEAD, SIGN_IN) => {
                self.sign_in_page(req.headers(), StatusCode::OK, "/", None)
            }
            (Method::POST, SIGN_IN) => self.post_sign_in(req, ip).await,
            (Method::POST, CODE) => self.post_code(req, ip).await,
            (Method::GET | Method::HEAD, LINK) => self.get_link(req),
            (Method::POST, LINK) => self.post_link(req).await,
            (Method::GET | Method::HEAD, LOGOUT) => match self.session(req.headers()) {
                Some(s) => {
                    let csrf = tokens::csrf_token(&self.csrf_key, "logout", &s.id);
                    html(StatusCode::OK, pages::logout(LOGOUT, &csrf, &s.email))
                }
                None => self.message(StatusCode::OK, "Signed out", "You are not signed in."),
            },
            (Method::POST, LOGOUT) => self.post_logout(req).await,
            _ => self.message(StatusCode::NOT_FOUND, "Not found", "There is no such page."),
        }
    }

    /// The response to a POST whose form could not be read.
    fn unreadable_form(&self) -> Response<Body> {
        self.message(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The form could not be read.",
        )
    }

    /// Reads a POSTed form. The browser (its state cookie) is returned
    /// only when the form's CSRF token was made for it and for `purpose`;
    /// each caller answers a stale form in its own words.
    async fn posted_form(
        &self,
        req: Request<Incoming>,
        purpose: &str,
    ) -> Result<(HeaderMap, HashMap<String, String>, Option<String>), Response<Body>> {
        let headers = req.headers().clone();
        let Some(form) = read_form(req).await else {
            return Err(self.unreadable_form());
        };
        let presented = form.get("csrf").map(String::as_str).unwrap_or("");
        let browser = cookie(&headers, STATE_COOKIE)
            .filter(|v| tokens::looks_like_secret(v))
            .filter(|b| tokens::csrf_ok(&self.csrf_key, purpose, b, presented))
            .map(str::to_owned);
        Ok((headers, form, browser))
    }

    async fn post_sign_in(&self, req: Request<Incoming>, ip: IpAddr) -> Response<Body> {
        let (headers, form, browser) = match self.posted_form(req, "sign-in").await {
            Ok(posted) => posted,
            Err(unreadable) => return unreadable,
        };
        let next = form.get("next").map(String::as_str).unwrap_or("/");
        // The sign-in form again, with a note on what went wrong.
        let again = |status, note| self.sign_in_page(&headers, status, next, Some(note));
        let Some(browser) = browser.as_deref() else {
            tracing::info!(event = "gate_csrf_rejected", form = "sign-in", ip = %ip);
            return again(
                StatusCode::FORBIDDEN,
                "This page was out of date or your browser blocked its cookie. Please try again (cookies must be enabled).",
            );
        };
        let limits = &self.limits;
        if let Some(r) = self.limited(&limits.sign_in_ip, &ip.to_string(), "sign_in", "ip", ip) {
            return r;
        }
        let raw_email = form.get("email").map(String::as_str).unwrap_or("");
        let Ok(email) = super::config::EmailAddress::parse(raw_email) else {
            return again(
                StatusCode::BAD_REQUEST,
                "That does not look like an email address.",
            );
        };
        let address = email.key();
        if let Some(r) = self.limited(&limits.sign_in_address, &address, "sign_in", "address", ip) {
            return r;
        }
        let browser_digest = tokens::digest(browser);
        if self.allowed().allows(&email) {
            let token = tokens::new_secret();
            let code = tokens::new_code();
            let pending = Pending {
                email: email.key(),
                token_digest: tokens::digest(&token),
                code_digest: tokens::digest(&code),
                expires: Instant::now() + self.config.sign_in.link_ttl,
                tries_left: CODE_TRIES,
                next: safe_next(next),
            };
            self.insert_pending(browser_digest, pending);
            let link = format!("{}{LINK}?token={token}", self.config.base_url);
            let mailer = self.mailer.clone();
            let site = self.config.base_url.authority();
            let ttl = self.config.sign_in.link_ttl;
            let to = email.to_string();
            tokio::spawn(async move {
                match mailer.send_sign_in(&to, &site, &link, &code, ttl).await {
                    Ok(()) => tracing::info!(event = "gate_mail_sent"),
                    Err(e) => tracing::error!(event = "gate_mail_failed", error = %e),
                }
            });
            tracing::info!(event = "gate_sign_in_requested", allowed = true, ip = %ip);
        } else {
            // Forget any earlier request of this browser, exactly as a new
            // allowed request would replace it.
            self.lock_pending().remove(&browser_digest);
            tracing::info!(event = "gate_sign_in_requested", allowed = false, ip = %ip);
        }
        let csrf = tokens::csrf_token(&self.csrf_key, "code", browser);
        html(StatusCode::OK, pages::check_mail(CODE, &csrf, None))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        crate::sync::lock(&self.pending)
    }

    fn insert_pending(&self, browser_digest: String, p: Pending) {
        let mut pending = self.lock_pending();
        let now = Instant::now();
        pending.retain(|_, p| p.expires > now);
        if pending.len() >= MAX_PENDING
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.expires)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(browser_digest, p);
    }

    async fn post_code(&self, req: Request<Incoming>, ip: IpAddr) -> Response<Body> {
        let (headers, form, browser) = match self.posted_form(req, "code").await {
            Ok(posted) => posted,
            Err(unreadable) => return unreadable,
        };
        let Some(browser) = browser.as_deref() else {
            tracing::info!(event = "gate_csrf_rejected", form = "code", ip = %ip);
            return self.sign_in_page(
                &headers,
                StatusCode::FORBIDDEN,
                "/",
                Some("This page was out of date. Please request a new sign-in mail."),
            );
        };
        if let Some(r) = self.limited(&self.limits.code_ip, &ip.to_string(), "code", "ip", ip) {
            return r;
        }
        let csrf = tokens::csrf_token(&self.csrf_key, "code", browser);
        // The same answer for an unknown request and a wrong code.
        let wrong_code = || {
            let note = "That code is not right. Check the mail and try again.";
            html(
                StatusCode::BAD_REQUEST,
                pages::check_mail(CODE, &csrf, Some(note)),
            )
        };
        let typed = form.get("code").and_then(|c| tokens::normalize_code(c));
        let browser_digest = tokens::digest(browser);
        let mut pending = self.lock_pending();
        let Some(p) = pending.get_mut(&browser_digest) else {
            drop(pending);
            return wrong_code();
        };
        if p.expires <= Instant::now() {
            pending.remove(&browser_digest);
            drop(pending);
            return self.expired("Code expired", "This code");
        }
        if typed.map(|c| tokens::digest(&c)) != Some(p.code_digest.clone()) {
            p.tries_left = p.tries_left.saturating_sub(1);
            if p.tries_left == 0 {
                pending.remove(&browser_digest);
                drop(pending);
                tracing::info!(event = "gate_code_burned", ip = %ip);
                return self.message(
                    StatusCode::FORBIDDEN,
                    "Too many wrong codes",
                    "Too many wrong codes: this sign-in request is cancelled. Request a new sign-in mail.",
                );
            }
            drop(pending);
            return wrong_code();
        }
        let Some(p) = pending.remove(&browser_digest) else {
            return self.message(StatusCode::GONE, "Expired", "Request a new sign-in mail.");
        };
        drop(pending);
        self.signed_in(&p, "code")
    }

    fn get_link(&self, req: Request<Incoming>) -> Response<Body> {
        let token = req
            .uri()
            .query()
            .and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "token")
                    .map(|(_, v)| v.into_owned())
            })
            .unwrap_or_default();
        let (browser, new) = self.browser(req.headers());
        let csrf = tokens::csrf_token(&self.csrf_key, "link", &browser);
        let r = html(StatusCode::OK, pages::confirm_link(LINK, &csrf, &token));
        self.with_browser(r, &browser, new)
    }

    async fn post_link(&self, req: Request<Incoming>) -> Response<Body> {
        let (_, form, browser) = match self.posted_form(req, "link").await {
            Ok(posted) => posted,
            Err(unreadable) => return unreadable,
        };
        let Some(browser) = browser.as_deref() else {
            return self.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This page was out of date or your browser blocked its cookie. Open the link from the mail again.",
            );
        };
        let token = form.get("token").map(String::as_str).unwrap_or("");
        if !tokens::looks_like_secret(token) {
            return self.invalid_link();
        }
        let token_digest = tokens::digest(token);
        let browser_digest = tokens::digest(browser);
        let mut pending = self.lock_pending();
        let Some(owner) = pending
            .iter()
            .find(|(_, p)| p.token_digest == token_digest)
            .map(|(k, _)| k.clone())
        else {
            drop(pending);
            return self.invalid_link();
        };
        let expired = pending
            .get(&owner)
            .is_some_and(|p| p.expires <= Instant::now());
        if expired {
            pending.remove(&owner);
            drop(pending);
            return self.expired("Link expired", "This sign-in link");
        }
        if owner != browser_digest {
            drop(pending);
            return self.message(
                StatusCode::FORBIDDEN,
                "Use the code instead",
                "This link was requested from another browser or device. Type the 6-digit code from the mail into the page where you asked to sign in.",
            );
        }
        let Some(p) = pending.remove(&owner) else {
            return self.invalid_link();
        };
        drop(pending);
        self.signed_in(&p, "link")
    }

    fn invalid_link(&self) -> Response<Body> {
        self.message(
            StatusCode::GONE,
            "Link not valid",
            "This sign-in link is not valid or was already used. Request a new sign-in mail.",
        )
    }

    fn signed_in(&self, p: &Pending, by: &'static str) -> Response<Body> {
        let secret = match self.store.create(&p.email) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(event = "gate_store_failed", error = %e);
                return self.message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Try again later",
                    "Signing in failed on our side. Please try again later.",
                );
            }
        };
        tracing::info!(event = "gate_signed_in", by);
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        if let Ok(v) = HeaderValue::from_str(&safe_next(&p.next)) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let cookie = self.session_cookie_header(&secret, self.config.sign_in.session_ttl.as_secs());
        add_cookie(&mut r, cookie);
        r
    }

    async fn post_logout(&self, req: Request<Incoming>) -> Response<Body> {
        let session = self.session(req.headers());
        let Some(form) = read_form(req).await else {
            return self.unreadable_form();
        };
        let Some(session) = session else {
            return self.message(StatusCode::OK, "Signed out", "You are not signed in.");
        };
        let presented = form.get("csrf").map(String::as_str).unwrap_or("");
        if !tokens::csrf_ok(&self.csrf_key, "logout", &session.id, presented) {
            return self.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This sign-out form was out of date. Open the sign-out page again.",
            );
        }
        if let Err(e) = self.store.delete(&session.id) {
            tracing::error!(event = "gate_store_failed", error = %e);
        }
        tracing::info!(event = "gate_signed_out");
        let mut r = self.message(StatusCode::OK, "Signed out", "You are signed out.");
        add_cookie(&mut r, self.session_cookie_header("", 0));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_same_origin_only() {
        assert_eq!(safe_next("/app?x=1"), "/app?x=1");
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example/",
            "evil",
            "/_runewarp/gate/logout",
            "/a b",
            "",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad}");
        }
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let cookies = "a=1; __Host-runegate-state=s; __Host-runegate=x";
        let h = crate::gate::test_headers(&[("cookie", cookies)]);
        assert_eq!(cookie(&h, "__Host-runegate"), Some("x"));
        assert_eq!(cookie(&h, STATE_COOKIE), Some("s"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
