//! SSO sign-in: the control server as an OpenID Connect relying party
//! (authorization code + PKCE + nonce + state, via `openidconnect`).
//!
//! A device asks to log in (`POST /v1/login`) and gets a URL to open in any
//! browser plus a wait token; it then waits (`GET /v1/login/wait`) while
//! its user opens `GET /login/ID`, which redirects to the IdP, and the IdP
//! sends the browser back to `GET /oidc/callback`. There the code is
//! exchanged, the ID token checked (signature, issuer, audience, nonce),
//! `email_verified` required, and the device enrolled into the
//! organisation the identity belongs to. No localhost callback: the
//! browser may be on another machine.
//!
//! Pending logins live in memory only (a restart forgets them; the device
//! asks again). Each expires after [`LOGIN_TTL`] and completes once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AsyncHttpClient, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, HttpRequest, HttpResponse, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};

use super::config::{ControlConfig, OidcConfig};
use super::store::Login;
use crate::mesh_protocol::RegisterResponse;

/// How long a device's login may take, from `POST /v1/login` to the end.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Pending logins held at once (beyond: 503).
const MAX_PENDING: usize = 10_000;
/// Provider metadata and keys are fetched again after this long (key
/// rotation).
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// A request to the IdP must finish within this.
const IDP_DEADLINE: Duration = Duration::from_secs(15);
/// Largest IdP answer read.
const MAX_IDP_BODY: usize = 1 << 20;

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why the OIDC set-up failed at start.
#[derive(Debug, thiserror::Error)]
pub enum OidcSetupError {
    #[error("control.oidc.client-secret-file {path}: {error}")]
    Secret { path: String, error: std::io::Error },
    #[error("control.oidc.client-secret-file {0} is empty")]
    EmptySecret(String),
    #[error("control.oidc.ca-file: {0}")]
    Ca(String),
    #[error("control.oidc: {0}")]
    Url(String),
}

/// The IdP's HTTP client: hyper over rustls, trusting the public web roots
/// plus `ca-file`. Redirects are not followed (as OAuth 2 requires).
pub struct IdpHttp {
    tls: Arc<rustls::ClientConfig>,
}

/// An IdP request that failed (no body contents in it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdpHttpError(String);

impl IdpHttp {
    pub fn new(ca_file: Option<&std::path::Path>) -> Result<Self, OidcSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            for c in crate::tls::material::load_ca_bundle(path)
                .map_err(|e| OidcSetupError::Ca(e.to_string()))?
            {
                roots
                    .add(c)
                    .map_err(|e| OidcSetupError::Ca(format!("{}: {e}", path.display())))?;
            }
        }
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { tls: Arc::new(c) })
    }

    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        tokio::time::timeout(IDP_DEADLINE, self.send_inner(request))
            .await
            .map_err(|_| IdpHttpError("the identity provider did not answer in time".into()))?
    }

    async fn send_inner(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        let fail = |m: String| IdpHttpError(m);
        let (parts, body) = request.into_parts();
        let uri = parts.uri.clone();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(fail(format!("unsupported URL {uri}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| fail(format!("no host in {uri}")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(format!("connect {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let mut req = hyper::Request::builder().method(parts.method).uri(path);
        for (k, v) in &parts.headers {
            req = req.header(k, v);
        }
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let req = req
            .header(hyper::header::HOST, authority)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(e.to_string()))?;
        let resp = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| fail(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS to {host}: {e}")))?;
            exchange(hyper_util::rt::TokioIo::new(tls), req).await?
        } else {
            exchange(hyper_util::rt::TokioIo::new(tcp), req).await?
        };
        Ok(resp)
    }
}

async fn exchange<I>(io: I, req: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, IdpHttpError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| IdpHttpError(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| IdpHttpError(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_IDP_BODY)
        .collect()
        .await
        .map_err(|e| IdpHttpError(format!("reading the answer: {e}")))?
        .to_bytes();
    let mut out = openidconnect::http::Response::builder().status(parts.status);
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    out.body(body.to_vec())
        .map_err(|e| IdpHttpError(e.to_string()))
}

impl<'c> AsyncHttpClient<'c> for IdpHttp {
    type Error = IdpHttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, IdpHttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// The browser part of a login, once `/login/ID` was opened.
struct Auth {
    csrf: String,
    pkce: String,
    nonce: String,
}

/// How a login ended.
#[derive(Debug)]
pub enum Outcome {
    Enrolled(RegisterResponse),
    Refused(String),
}

struct Pending {
    created: Instant,
    wait_hash: Vec<u8>,
    public_key: String,
    hostname: String,
    auth: Option<Auth>,
    outcome: Option<Outcome>,
    done: tokio::sync::watch::Sender<bool>,
}

/// The relying party: configuration, the IdP's metadata (fetched on
/// first use and hourly) and the pending logins.
pub struct Oidc {
    config: OidcConfig,
    secret: String,
    http: IdpHttp,
    redirect: RedirectUrl,
    origin: String,
    client: tokio::sync::Mutex<Option<(Instant, Arc<Client>)>>,
    pending: Mutex<HashMap<String, Pending>>,
}

fn sha256(s: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .to_vec()
}

/// What `POST /v1/login` answers.
pub struct Started {
    pub id: String,
    pub login_url: String,
    pub wait_token: String,
}

/// What a wait finds.
pub enum Waited {
    Done(Outcome),
    Pending,
    Unknown,
}

/// The verified identity from one callback.
#[derive(Debug)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: String,
    pub hd: Option<String>,
    pub tid: Option<String>,
    pub groups: Vec<String>,
}

/// The callback's failure: a page for the browser (and the device).
#[derive(Debug)]
pub enum CallbackError {
    /// Unknown, used or expired state: nothing to tell a device.
    UnknownState,
    /// The login failed; the device learns why too.
    Refused { login: String, message: String },
}

impl Oidc {
    pub fn new(control: &ControlConfig, config: &OidcConfig) -> Result<Self, OidcSetupError> {
        let path = config.client_secret_file.display().to_string();
        let secret = std::fs::read_to_string(&config.client_secret_file)
            .map_err(|error| OidcSetupError::Secret {
                path: path.clone(),
                error,
            })?
            .trim()
            .to_string();
        if secret.is_empty() {
            return Err(OidcSetupError::EmptySecret(path));
        }
        let origin = control.public_origin();
        let redirect = RedirectUrl::new(format!("{origin}/oidc/callback"))
            .map_err(|e| OidcSetupError::Url(e.to_string()))?;
        IssuerUrl::new(config.issuer.clone()).map_err(|e| OidcSetupError::Url(e.to_string()))?;
        Ok(Self {
            http: IdpHttp::new(config.ca_file.as_deref())?,
            config: config.clone(),
            secret,
            redirect,
            origin,
            client: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The client, with metadata no older than [`METADATA_TTL`].
    async fn client(&self) -> Result<Arc<Client>, String> {
        let mut cached = self.client.lock().await;
        if let Some((at, c)) = cached.as_ref()
            && at.elapsed() < METADATA_TTL
        {
            return Ok(c.clone());
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| e.to_string())?;
        let meta = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| format!("discovery at {}: {e}", self.config.issuer))?;
        let client = Arc::new(
            CoreClient::from_provider_metadata(
                meta,
                ClientId::new(self.config.client_id.clone()),
                Some(ClientSecret::new(self.secret.clone())),
            )
            .set_redirect_uri(self.redirect.clone()),
        );
        tracing::info!(event = "oidc_metadata_loaded", issuer = %self.config.issuer);
        *cached = Some((Instant::now(), client.clone()));
        Ok(client)
    }

    fn sweep(map: &mut HashMap<String, Pending>) {
        map.retain(|_, p| p.created.elapsed() < LOGIN_TTL);
    }

    /// A new pending login for a device; None when too many are pending.
    pub fn start(&self, public_key: &str, hostname: &str) -> Option<Started> {
        let id = super::store::new_secret("");
        let wait_token = super::store::new_secret("rww_");
        let mut map = crate::sync::lock(&self.pending);
        Self::sweep(&mut map);
        if map.len() >= MAX_PENDING {
            return None;
        }
        let (done, _) = tokio::sync::watch::channel(false);
        map.insert(
            id.clone(),
            Pending {
                created: Instant::now(),
                wait_hash: sha256(&wait_token),
                public_key: public_key.to_string(),
                hostname: hostname.to_string(),
                auth: None,
                outcome: None,
                done,
            },
        );
        Some(Started {
            login_url: format!("{}/login/{id}", self.origin),
            id,
            wait_token,
        })
    }

    /// Wait up to `limit` for the login whose wait token is `token`; a
    /// finished login is handed out once, then forgotten.
    pub async fn wait(&self, token: &str, limit: Duration) -> Waited {
        let h = sha256(token);
        let find = |map: &mut HashMap<String, Pending>| {
            Self::sweep(map);
            map.iter()
                .find(|(_, p)| p.wait_hash == h)
                .map(|(id, _)| id.clone())
        };
        let mut rx = {
            let mut map = crate::sync::lock(&self.pending);
            let Some(id) = find(&mut map) else {
                return Waited::Unknown;
            };
            match map.get(&id) {
                Some(p) => p.done.subscribe(),
                None => return Waited::Unknown,
            }
        };
        let _ = tokio::time::timeout(limit, rx.wait_for(|d| *d)).await;
        let mut map = crate::sync::lock(&self.pending);
        let Some(id) = find(&mut map) else {
            return Waited::Unknown;
        };
        if map.get(&id).is_some_and(|p| p.outcome.is_some())
            && let Some(Pending {
                outcome: Some(o), ..
            }) = map.remove(&id)
        {
            return Waited::Done(o);
        }
        Waited::Pending
    }

    /// `GET /login/ID`: the IdP's authorization URL for this login (with
    /// a fresh state, nonce and PKCE challenge), or None if the login is
    /// unknown, expired or finished.
    pub async fn authorize(&self, id: &str) -> Result<Option<String>, String> {
        {
            let mut map = crate::sync::lock(&self.pending);
            Self::sweep(&mut map);
            if map.get(id).is_none_or(|p| p.outcome.is_some()) {
                return Ok(None);
            }
        }
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for s in self.config.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let (url, csrf, nonce) = req.set_pkce_challenge(challenge).url();
        let mut map = crate::sync::lock(&self.pending);
        let Some(p) = map.get_mut(id).filter(|p| p.outcome.is_none()) else {
            return Ok(None);
        };
        // Opening the URL again replaces the previous attempt's state.
        p.auth = Some(Auth {
            csrf: csrf.secret().clone(),
            pkce: verifier.secret().clone(),
            nonce: nonce.secret().clone(),
        });
        Ok(Some(url.to_string()))
    }

    /// `GET /oidc/callback`: match `state` to a pending login (once),
    /// exchange `code`, verify the ID token. Returns the login id, the
    /// device's key and hostname, and who signed in.
    pub async fn callback(
        &self,
        state: &str,
        code: Option<&str>,
        idp_error: Option<&str>,
        iss: Option<&str>,
    ) -> Result<(String, String, String, Identity), CallbackError> {
        // Single use: the state is taken out before anything else.
        let (id, auth, public_key, hostname) = {
            let mut map = crate::sync::lock(&self.pending);
            Self::sweep(&mut map);
            // Compared as hashes: no early exit on the secret's bytes.
            let wanted = sha256(state);
            let found = map.iter_mut().find(|(_, p)| {
                p.outcome.is_none() && p.auth.as_ref().is_some_and(|a| sha256(&a.csrf) == wanted)
            });
            let Some((id, p)) = found else {
                return Err(CallbackError::UnknownState);
            };
            let Some(auth) = p.auth.take() else {
                return Err(CallbackError::UnknownState);
            };
            (id.clone(), auth, p.public_key.clone(), p.hostname.clone())
        };
        let refuse = |message: String| CallbackError::Refused {
            login: id.clone(),
            message,
        };
        if let Some(e) = idp_error {
            return Err(refuse(format!("the identity provider refused: {e}")));
        }
        // RFC 9207: an IdP that names itself must be the one configured
        // (no code from another issuer is sent to this one's token endpoint).
        if iss.is_some_and(|i| i != self.config.issuer) {
            return Err(refuse(
                "the answer names another identity provider (iss)".into(),
            ));
        }
        let Some(code) = code else {
            return Err(refuse("the identity provider sent no code".into()));
        };
        let client = self.client().await.map_err(&refuse)?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| refuse(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(auth.pkce))
            .request_async(&self.http)
            .await
            .map_err(|e| refuse(format!("code exchange failed: {e}")))?;
        let Some(id_token) = token.id_token() else {
            return Err(refuse("the identity provider sent no ID token".into()));
        };
        let claims = id_token
            .claims(&client.id_token_verifier(), &Nonce::new(auth.nonce))
            .map_err(|e| refuse(format!("the ID token is not valid: {e}")))?;
        let Some(email) = claims.email() else {
            return Err(refuse(
                "the identity provider sent no email address (is the \"email\" scope granted?)"
                    .into(),
            ));
        };
        if claims.email_verified() != Some(true) {
            return Err(refuse(format!(
                "the identity provider has not verified the email address {}; verify it there, then sign in again",
                email.as_str()
            )));
        }
        // Claims openidconnect's core set lacks, from the payload whose
        // signature was just verified.
        let extra = extra_claims(&id_token.to_string());
        let text = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let groups = extra
            .get("groups")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((
            id,
            public_key,
            hostname,
            Identity {
                issuer: claims.issuer().as_str().to_string(),
                subject: claims.subject().as_str().to_string(),
                email: email.as_str().trim().to_ascii_lowercase(),
                hd: text("hd"),
                tid: text("tid"),
                groups,
            },
        ))
    }

    /// Record how login `id` ended and wake its waiting device.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut map = crate::sync::lock(&self.pending);
        if let Some(p) = map.get_mut(id) {
            p.outcome = Some(outcome);
            p.auth = None;
            p.done.send_replace(true);
        }
    }
}

/// The JSON payload of a compact JWT (no verification: the caller has
/// verified this token).
fn extra_claims(jwt: &str) -> serde_json::Map<String, serde_json::Value> {
    use base64::Engine;
    jwt.split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The organisation an identity belongs to, as (key, name): personal
/// (`sub:SUBJECT`, the email) for a consumer domain; else Google's `hd`,
/// Entra's `tid` (`tid:TENANT`, named by the email domain), or the email
/// domain. The store pairs the key with the issuer.
pub fn organisation(config: &ControlConfig, who: &Identity) -> Option<(String, String)> {
    let (local, domain) = who.email.rsplit_once('@')?;
    if local.is_empty() || !domain.contains('.') {
        return None;
    }
    if config.consumer_domains.iter().any(|d| d == domain) {
        return Some((format!("sub:{}", who.subject), who.email.clone()));
    }
    if let Some(hd) = &who.hd {
        let hd = hd.to_ascii_lowercase();
        return Some((hd.clone(), hd));
    }
    if let Some(tid) = &who.tid {
        return Some((format!("tid:{tid}"), domain.to_string()));
    }
    Some((domain.to_string(), domain.to_string()))
}

/// The store's view of a verified sign-in.
pub fn login_record(config: &ControlConfig, who: &Identity) -> Option<Login> {
    let (org_key, org_name) = organisation(config, who)?;
    let expires = std::time::SystemTime::now() + config.key_expiry;
    let expires_at = expires
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(i64::MAX);
    Some(Login {
        issuer: who.issuer.clone(),
        subject: who.subject.clone(),
        email: who.email.clone(),
        admin: config.is_admin(&who.email, &who.groups),
        groups: who.groups.clone(),
        org_key,
        org_name,
        expires_at,
    })
}

/// A small HTML page for the browser.
pub fn page(title: &str, message: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1><p>{m}</p></body></html>\n",
        t = esc(title),
        m = esc(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(email: &str, hd: Option<&str>, tid: Option<&str>) -> Identity {
        Identity {
            issuer: "https://idp.example".into(),
            subject: "s1".into(),
            email: email.into(),
            hd: hd.map(Into::into),
            tid: tid.map(Into::into),
            groups: vec![],
        }
    }

    #[test]
    fn organisations_follow_hd_tid_domain_and_consumer_domains() {
        let c = ControlConfig::parse(
            "c.toml",
            std::path::Path::new("/"),
            "[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\n",
        )
        .unwrap();
        let org = |w: &Identity| organisation(&c, w).unwrap();
        assert_eq!(
            org(&who("a@acme.com", Some("acme.com"), None)),
            ("acme.com".into(), "acme.com".into())
        );
        assert_eq!(
            org(&who("a@sub.acme.com", None, Some("T1"))),
            ("tid:T1".into(), "sub.acme.com".into())
        );
        assert_eq!(
            org(&who("c@globex.com", None, None)),
            ("globex.com".into(), "globex.com".into())
        );
        assert_eq!(
            org(&who("d@gmail.com", None, None)),
            ("sub:s1".into(), "d@gmail.com".into())
        );
        assert!(organisation(&c, &who("nobody", None, None)).is_none());
    }

    #[test]
    fn extra_claims_read_the_payload() {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"hd":"acme.com","groups":["eng"]}"#);
        let m = extra_claims(&format!("h.{p}.s"));
        assert_eq!(m["hd"], "acme.com");
        assert!(extra_claims("garbage").is_empty());
    }
}
