//! Automatic certificates over ACME (RFC 8555) with the TLS-ALPN-01
//! challenge (RFC 8737), for the Server hostname (`[server.acme]`) and for
//! the Public hostnames of terminating Services (`[client.acme]`).
//!
//! The ACME protocol itself (account, order, authorization, finalize,
//! renewal timing) is `rustls-acme`'s [`AcmeState`]. This module adds what
//! Runewarp needs around it:
//!
//! - one [`AcmeState`] per hostname, so each hostname has its own
//!   certificate and challenge slot, and a hostname whose order fails does
//!   not hold the others back;
//! - [`StateDirCache`]: the account key and certificates persist in
//!   `state-dir` (directory 0700, files 0600, written atomically; an
//!   existing `state-dir` with a looser mode is tightened to 0700 with a
//!   `state_dir_tightened` warning, a symbolic link is refused, and a
//!   group- or world-readable file is reported when read), with the
//!   same file names as `rustls-acme`'s own directory cache so a state
//!   directory can be shared with other `rustls-acme` users;
//! - the directory's HTTPS trusts the bundled web PKI roots plus
//!   `directory-ca-file`, if given;
//! - a driver task per hostname that logs every step as a stable event and
//!   extracts the CA's problem document (type, detail) from failures.
//!   `rustls-acme` retries a failed order after 1 s, doubling up to ~18 h;
//!   a success resets it. Nothing here ever ends the process;
//! - `AcmeResolver`: a [`ResolvesServerCert`] choosing by SNI, answering
//!   `acme-tls/1` ClientHellos with the challenge certificate and every
//!   other ClientHello with the issued certificate, or with nothing (the
//!   handshake fails closed) while there is none yet.
//!
//! Startup never waits for issuance: `AcmeManager::spawn` starts the
//! drivers and returns at once; a cached certificate is deployed as soon as
//! it is read, and renewal (at two thirds of the validity) swaps the new
//! certificate in while the old one keeps serving.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_acme::caches::CompositeCache;
use rustls_acme::{
    AccountCache, AcmeState, CertCache, EventError, EventOk, OrderError, ResolvesServerCertAcme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::AcmeConfig;
use crate::fsutil;
use crate::hostname::wire_lookup_key;
use crate::sync::AbortOnDrop;
use crate::tls::material;

/// The ALPN protocol of TLS-ALPN-01 challenge connections.
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Mode of `state-dir`.
pub(crate) const STATE_DIR_MODE: u32 = 0o700;
/// Mode of every file in `state-dir` (account key, key + certificate chain).
pub(crate) const STATE_FILE_MODE: u32 = 0o600;

/// A TLS-ALPN-01 challenge handshake must finish within this time.
pub(crate) const CHALLENGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Why ACME could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    #[error("{section}.state-dir: cannot use {}: {error}", path.display())]
    /// The `state-dir` cannot be created or used.
    StateDir {
        /// `server.acme` or `client.acme`.
        section: &'static str,
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    #[error("{section}.directory-ca-file: {error}")]
    /// The `directory-ca-file` cannot be read.
    DirectoryCa {
        /// `server.acme` or `client.acme`.
        section: &'static str,
        /// The underlying error.
        error: Box<material::MaterialError>,
    },
    #[error("{section}.directory-ca-file: {}: certificate rejected: {error}", path.display())]
    /// A certificate in `directory-ca-file` was rejected.
    BadDirectoryCa {
        /// `server.acme` or `client.acme`.
        section: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    /// The TLS configuration could not be built.
    Tls(#[from] rustls::Error),
}

/// Is this ClientHello a TLS-ALPN-01 validation (ALPN exactly `acme-tls/1`,
/// as RFC 8737 requires of the CA)?
pub(crate) fn is_challenge_alpn(alpn: &[Vec<u8>]) -> bool {
    alpn.len() == 1 && alpn[0] == ACME_TLS_ALPN
}

/// The ACME certificates of one role (Server or Client instance): the
/// resolver to serve from, and the per-hostname state machines to drive.
pub(crate) struct AcmeManager {
    role: &'static str,
    directory_url: String,
    resolver: Arc<AcmeResolver>,
    states: Vec<(String, State)>,
}

type State = AcmeState<io::Error, io::Error>;

impl AcmeManager {
    /// Prepare ACME for `hostnames`: create `state-dir`, build the
    /// directory's TLS trust. Nothing is requested until [`Self::spawn`].
    pub fn new(
        role: &'static str,
        section: &'static str,
        config: &AcmeConfig,
        hostnames: &[String],
    ) -> Result<Self, AcmeSetupError> {
        fsutil::create_dir_private(&config.state_dir, STATE_DIR_MODE).map_err(|error| {
            AcmeSetupError::StateDir {
                section,
                path: config.state_dir.clone(),
                error,
            }
        })?;
        let client_tls = Arc::new(directory_client_config(section, config)?);
        let mut by_hostname = HashMap::new();
        let mut states = Vec::new();
        for hostname in hostnames {
            let cache = StateDirCache::new(config.state_dir.clone());
            let mut acme =
                rustls_acme::AcmeConfig::new_with_client_config([hostname], client_tls.clone())
                    .cache(CompositeCache::new(cache.clone(), cache))
                    .directory(&config.directory_url);
            if let Some(email) = &config.email {
                acme = acme.contact_push(format!("mailto:{email}"));
            }
            let state = acme.state();
            by_hostname.insert(hostname.clone(), state.resolver());
            states.push((hostname.clone(), state));
        }
        Ok(Self {
            role,
            directory_url: config.directory_url.clone(),
            resolver: Arc::new(AcmeResolver { by_hostname }),
            states,
        })
    }

    /// The certificate resolver (SNI → issued or challenge certificate).
    pub(crate) fn resolver(&self) -> Arc<AcmeResolver> {
        self.resolver.clone()
    }

    /// Start one driver task per hostname. They run until the returned
    /// handle is dropped.
    pub fn spawn(self) -> AcmeTasks {
        let mut tasks = Vec::new();
        for (hostname, state) in self.states {
            tasks.push(AbortOnDrop::new(tokio::spawn(drive(
                self.role,
                hostname,
                self.directory_url.clone(),
                state,
            ))));
        }
        AcmeTasks(tasks)
    }
}

/// The running drivers; dropping this stops them.
pub(crate) struct AcmeTasks(Vec<AbortOnDrop>);

impl fmt::Debug for AcmeTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AcmeTasks({})", self.0.len())
    }
}

/// The TLS client config for the ACME directory: web PKI roots plus
/// `directory-ca-file`.
fn directory_client_config(
    section: &'static str,
    config: &AcmeConfig,
) -> Result<rustls::ClientConfig, AcmeSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.directory_ca_file {
        let certs =
            material::load_ca_bundle(path).map_err(|error| AcmeSetupError::DirectoryCa {
                section,
                error: Box::new(error),
            })?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|error| AcmeSetupError::BadDirectoryCa {
                    section,
                    path: path.clone(),
                    error,
                })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Drive one hostname's state machine forever, logging what happens.
async fn drive(role: &'static str, hostname: String, directory: String, mut state: State) {
    tracing::info!(event = "acme_started", role, hostname = %hostname, directory = %directory);
    let mut failures: u32 = 0;
    while let Some(event) = state.next().await {
        match event {
            Ok(EventOk::DeployedCachedCert) => {
                tracing::info!(event = "acme_certificate_loaded", role, hostname = %hostname)
            }
            Ok(EventOk::DeployedNewCert) => {
                failures = 0;
                tracing::info!(event = "acme_certificate_issued", role, hostname = %hostname, directory = %directory)
            }
            Ok(EventOk::CertCacheStore) => {
                tracing::debug!(event = "acme_certificate_saved", role, hostname = %hostname)
            }
            Ok(EventOk::AccountCacheStore) => {
                tracing::debug!(event = "acme_account_saved", role, hostname = %hostname)
            }
            Err(EventError::Order(error)) => {
                // rustls-acme waits 2^n s (n capped at 16) before the next try.
                let retry_in_s = 1u64 << failures.min(16);
                failures = failures.saturating_add(1);
                let problem = Problem::from_order_error(&error);
                tracing::warn!(
                    event = "acme_order_failed",
                    role,
                    hostname = %hostname,
                    directory = %directory,
                    problem_type = problem.typ.as_deref().unwrap_or("-"),
                    problem_detail = ?problem.detail.as_deref().unwrap_or("-"),
                    error = ?error.to_string(),
                    retry_in_s,
                );
            }
            Err(error) => {
                // Cache I/O or an unparsable stored certificate: logged;
                // the state machine goes on (it orders a new certificate).
                tracing::warn!(event = "acme_state_error", role, hostname = %hostname, error = ?error.to_string());
            }
        }
    }
}

/// An ACME problem document's type and detail (RFC 8555 §6.7), as far as
/// they can be recovered from a failure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) typ: Option<String>,
    pub detail: Option<String>,
}

impl Problem {
    fn from_order_error(error: &OrderError) -> Self {
        let from = |p: &rustls_acme::acme::Problem| Problem {
            typ: p.typ.clone(),
            detail: p.detail.clone(),
        };
        match error {
            OrderError::BadOrder(order) => order.error.as_ref().map(from).unwrap_or_default(),
            OrderError::BadAuth(auth) => auth
                .challenges
                .iter()
                .find_map(|c| c.error.as_ref())
                .map(from)
                .unwrap_or_default(),
            other => Self::from_message(&other.to_string()),
        }
    }

    /// An HTTP failure carries the response body (the problem JSON) in its
    /// message as a debug-quoted string: `non 2xx http status: 400 "{..}"`.
    pub(crate) fn from_message(message: &str) -> Self {
        let Some(start) = message.find("non 2xx http status: ") else {
            return Self::default();
        };
        let rest = &message[start..];
        let Some(quote) = rest.find('"') else {
            return Self::default();
        };
        let Some(body) = unquote_debug(&rest[quote..]) else {
            return Self::default();
        };
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(rename = "type")]
            typ: Option<String>,
            detail: Option<String>,
        }
        match serde_json::from_str::<Doc>(&body) {
            Ok(doc) => Self {
                typ: doc.typ,
                detail: doc.detail,
            },
            Err(_) => Self {
                typ: None,
                detail: Some(body),
            },
        }
    }
}

/// Undo Rust's `{:?}` quoting of a string (the common escapes).
fn unquote_debug(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    // \u{XXXX}
                    let rest: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let hex = rest.strip_prefix('{')?;
                    out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Serves the ACME certificates by SNI.
#[derive(Debug)]
pub(crate) struct AcmeResolver {
    by_hostname: HashMap<String, Arc<ResolvesServerCertAcme>>,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = wire_lookup_key(hello.server_name()?);
        // rustls-acme's resolver answers acme-tls/1 with the challenge
        // certificate of a pending authorization (or nothing), and anything
        // else with the issued certificate (or nothing yet).
        self.by_hostname.get(&name)?.resolve(hello)
    }
}

/// A resolver for exactly one hostname that ignores SNI for ordinary
/// handshakes (the Server's QUIC listener, like `cert-dir` mode, presents
/// its certificate whatever name the Client asked for).
#[derive(Debug)]
pub(crate) struct SingleResolver(Arc<ResolvesServerCertAcme>);

impl AcmeResolver {
    pub fn single(&self, hostname: &str) -> Option<SingleResolver> {
        self.by_hostname.get(hostname).cloned().map(SingleResolver)
    }
}

impl ResolvesServerCert for SingleResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello)
    }
}

/// A rustls server config that answers TLS-ALPN-01 validations only.
pub(crate) fn challenge_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Complete a TLS-ALPN-01 validation handshake on `io` (whose first bytes,
/// already read, are `prefix`) and close. Returns whether it succeeded.
pub(crate) async fn answer_challenge<IO>(
    config: Arc<rustls::ServerConfig>,
    prefix: Bytes,
    io: IO,
) -> Result<(), &'static str>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = crate::relay::Prefixed::new(prefix, io);
    match tokio::time::timeout(CHALLENGE_DEADLINE, acceptor.accept(stream)).await {
        Ok(Ok(mut tls)) => {
            let _ = tokio::time::timeout(CHALLENGE_DEADLINE, tls.shutdown()).await;
            Ok(())
        }
        Ok(Err(_)) => Err("challenge_handshake_failed"),
        Err(_) => Err("challenge_timeout"),
    }
}

/// Account keys and certificates in `state-dir`.
///
/// File names: `cached_account_<h>` where `<h>` is the unpadded URL-safe
/// base64 of SHA-256 over each contact followed by a NUL byte, then the
/// directory URL; `cached_cert_<h>` likewise over each domain. A
/// certificate file holds the PKCS#8 key PEM followed by the chain PEM.
#[derive(Debug, Clone)]
pub struct StateDirCache {
    dir: PathBuf,
}

impl StateDirCache {
    /// A cache in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn name(prefix: &str, items: &[String], directory_url: &str) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for item in items {
            ctx.update(item.as_bytes());
            ctx.update(&[0]);
        }
        ctx.update(directory_url.as_bytes());
        let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.finish());
        format!("{prefix}{hash}")
    }

    /// The file holding the certificate for `domains` from `directory_url`.
    pub fn cert_path(dir: &Path, domains: &[String], directory_url: &str) -> PathBuf {
        dir.join(Self::name("cached_cert_", domains, directory_url))
    }

    /// The file holding the account key for `contact` at `directory_url`.
    pub(crate) fn account_path(dir: &Path, contact: &[String], directory_url: &str) -> PathBuf {
        dir.join(Self::name("cached_account_", contact, directory_url))
    }

    async fn read(path: PathBuf) -> io::Result<Option<Vec<u8>>> {
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(b) => {
                // Account keys and certificate keys.
                fsutil::warn_if_exposed(&path, "ACME state file");
                Ok(Some(b))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn write(dir: PathBuf, path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
        tokio::task::spawn_blocking(move || {
            fsutil::create_dir_private(&dir, STATE_DIR_MODE)?;
            fsutil::write_atomic(&path, &bytes, STATE_FILE_MODE)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// The two caches instant-acme asks for (certificates, account keys) are
/// the same files-in-the-state-dir store, named by a different path.
macro_rules! state_dir_cache {
    ($cache:ident, $error:ident, $load:ident, $store:ident, $path:ident) => {
        #[async_trait::async_trait]
        impl $cache for StateDirCache {
            type $error = io::Error;
            async fn $load(
                &self,
                names: &[String],
                directory_url: &str,
            ) -> io::Result<Option<Vec<u8>>> {
                Self::read(Self::$path(&self.dir, names, directory_url)).await
            }
            async fn $store(
                &self,
                names: &[String],
                directory_url: &str,
                bytes: &[u8],
            ) -> io::Result<()> {
                let path = Self::$path(&self.dir, names, directory_url);
                Self::write(self.dir.clone(), path, bytes.to_vec()).await
            }
        }
    };
}

state_dir_cache!(CertCache, EC, load_cert, store_cert, cert_path);
state_dir_cache!(AccountCache, EA, load_account, store_account, account_path);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_from_http_failure_message() {
        let msg = r#"acme error: http request error: non 2xx http status: 400 "{\n   \"type\": \"urn:ietf:params:acme:error:invalidContact\",\n   \"detail\": \"contact \\\"x\\\" is invalid\",\n   \"status\": 400\n}""#;
        let p = Problem::from_message(msg);
        assert_eq!(
            p.typ.as_deref(),
            Some("urn:ietf:params:acme:error:invalidContact")
        );
        assert_eq!(p.detail.as_deref(), Some("contact \"x\" is invalid"));
        assert_eq!(
            Problem::from_message("io error: refused"),
            Problem::default()
        );
    }

    #[test]
    fn challenge_alpn_is_exact() {
        assert!(is_challenge_alpn(&[b"acme-tls/1".to_vec()]));
        assert!(!is_challenge_alpn(&[
            b"h2".to_vec(),
            b"acme-tls/1".to_vec()
        ]));
        assert!(!is_challenge_alpn(&[]));
    }

    /// A manager for `a.example` keeping its state in `state_dir`; the
    /// error as text. (`section` is the role's `[ROLE.acme]`.)
    fn manager(
        role: &'static str,
        section: &'static str,
        state_dir: &Path,
    ) -> Result<AcmeManager, String> {
        crate::tls::install_crypto_provider();
        let config = AcmeConfig {
            email: None,
            state_dir: state_dir.to_path_buf(),
            directory_url: "https://127.0.0.1:9/dir".into(),
            directory_ca_file: None,
        };
        AcmeManager::new(role, section, &config, &["a.example".into()]).map_err(|e| e.to_string())
    }

    #[test]
    fn an_existing_loose_state_dir_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("acme");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        manager("server", "server.acme", &state).unwrap();
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_symlinked_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real");
        std::fs::create_dir(&target).unwrap();
        let state = dir.path().join("acme");
        std::os::unix::fs::symlink(&target, &state).unwrap();
        let err = match manager("client", "client.acme", &state) {
            Ok(_) => panic!("a symlinked state-dir was accepted"),
            Err(e) => e,
        };
        assert!(err.contains("client.acme.state-dir"), "{err}");
        assert!(err.contains("is a symbolic link"), "{err}");
    }

    #[test]
    fn state_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("acme");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let cache = StateDirCache::new(state.clone());
            let domains = vec!["a.example".to_string()];
            assert!(
                cache
                    .load_cert(&domains, "https://d/")
                    .await
                    .unwrap()
                    .is_none()
            );
            cache
                .store_cert(&domains, "https://d/", b"pem")
                .await
                .unwrap();
            cache
                .store_account(&[], "https://d/", b"key")
                .await
                .unwrap();
            assert_eq!(
                cache
                    .load_cert(&domains, "https://d/")
                    .await
                    .unwrap()
                    .unwrap(),
                b"pem"
            );
        });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for entry in std::fs::read_dir(&state).unwrap() {
            let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
