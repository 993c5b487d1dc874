//! Material, configs and processes for one run.

use super::*;

pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: Proc,
    pub(crate) client: Proc,
    pub(crate) tls_backend: StdTcpListener,
    pub(crate) plain_backend: StdTcpListener,
    pub(crate) backend_tls: Arc<rustls::ServerConfig>,
    pub(crate) visitor_tls: Arc<rustls::ClientConfig>,
    pub(crate) public: SocketAddr,
}

pub(crate) fn toml_str(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(crate) fn setup() -> Res<Setup> {
    runewarp::tls::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("runewarp-bench-")
        .tempdir()
        .ctx("create temp dir")?;
    let root = dir.path();
    let cert_dir = root.join("server");
    let id_dir = root.join("client");
    let public_dir = root.join("public");

    let server_host = ServerHostname::parse(SERVER_HOST).ctx("server hostname")?;
    material::init_server_cert(&cert_dir, &server_host, false).ctx("init server cert")?;
    material::init_client_identity(&id_dir, false).ctx("init client identity")?;
    let pin = material::show_client_identity(&id_dir).ctx("read client identity")?;
    let hosts = [PASS_HOST, TERM_HOST]
        .iter()
        .map(|h| PublicHostname::parse(h).ctx(format!("hostname {h}")))
        .collect::<Res<Vec<_>>>()?;
    material::init_public_certs(&public_dir, &hosts, false).ctx("init public certs")?;

    // Every path presents a leaf from the same Public hostname CA: the TLS
    // backend uses the passthrough hostname's leaf, the Client the other.
    let ca = material::load_ca_bundle(&public_dir.join("public-ca.crt")).ctx("load public CA")?;
    let leaf = material::load_public_certs(&public_dir)
        .ctx("load public leaves")?
        .into_iter()
        .find(|(h, _)| h.as_str() == PASS_HOST)
        .map(|(_, m)| m)
        .ok_or("no leaf for the passthrough hostname")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let backend_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ctx("backend TLS versions")?
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .ctx("backend TLS certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c).ctx("add public CA to Visitor roots")?;
    }
    let mut visitor_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ctx("Visitor TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    visitor_tls.resumption = Resumption::disabled();

    let tls_backend = StdTcpListener::bind("127.0.0.1:0").ctx("bind TLS backend")?;
    let plain_backend = StdTcpListener::bind("127.0.0.1:0").ctx("bind plain backend")?;
    let tls_addr = tls_backend.local_addr().ctx("TLS backend address")?;
    let plain_addr = plain_backend.local_addr().ctx("plain backend address")?;
    let public_port = ports::free_tcp();
    let tunnel_port = ports::free_udp();
    let public: SocketAddr = ([127, 0, 0, 1], public_port).into();

    // RUNEWARP_BENCH_CC=bbr|cubic sets congestion-control on both ends
    // (default: the config default), to compare controllers run by run.
    let cc = std::env::var("RUNEWARP_BENCH_CC")
        .map(|c| format!("congestion-control = {}\n", toml_str(Path::new(&c))))
        .unwrap_or_default();
    let server_toml = root.join("server.toml");
    let server_cfg = format!(
        "log-level = \"warn\"\n\n[server]\nhostname = \"{SERVER_HOST}\"\n\
         public-bind-address = \"127.0.0.1:{public_port}\"\n\
         tunnel-bind-address = \"127.0.0.1:{tunnel_port}\"\n\
         graceful-shutdown-duration = \"0s\"\ncert-dir = {cert}\n{cc}\n\
         [[server.tunnels]]\npublic-hostnames = [\"{PASS_HOST}\", \"{TERM_HOST}\"]\n\
         client-identity = \"{pin}\"\n",
        cert = toml_str(&cert_dir),
    );
    fs::write(&server_toml, server_cfg).ctx("write server.toml")?;
    let client_toml = root.join("client.toml");
    let client_cfg = format!(
        "log-level = \"warn\"\n\n[client]\nserver-address = \"{SERVER_HOST}:{tunnel_port}\"\n\
         server-trust = \"ca-file\"\nserver-ca-file = {ca}\nidentity-dir = {id}\n\
         public-cert-dir = {public}\n{cc}\n\
         [[client.services]]\npublic-hostnames = [\"{PASS_HOST}\"]\n\
         backend-address = \"{tls_addr}\"\ntls-mode = \"passthrough\"\n\n\
         [[client.services]]\npublic-hostnames = [\"{TERM_HOST}\"]\n\
         backend-address = \"{plain_addr}\"\ntls-mode = \"terminate\"\n",
        ca = toml_str(&cert_dir.join("server-ca.crt")),
        id = toml_str(&id_dir),
        public = toml_str(&public_dir),
    );
    fs::write(&client_toml, client_cfg).ctx("write client.toml")?;

    let exe = Path::new(env!("CARGO_BIN_EXE_runewarp"));
    let server = Proc::spawn("server", exe, &server_toml, root)?;
    let client = Proc::spawn("client", exe, &client_toml, root)?;
    Ok(Setup {
        dir,
        server,
        client,
        tls_backend,
        plain_backend,
        backend_tls: Arc::new(backend_tls),
        visitor_tls: Arc::new(visitor_tls),
        public,
    })
}
