//! SSO sign-in end to end (issue 16): a real OpenID Provider (the npm
//! package `oidc-provider`, tests/oidc/provider.js, on Node.js), a real
//! control server, device agents that print a login URL and wait, and a
//! small cookie-keeping HTTP client standing in for the browser: it follows
//! redirects and submits the provider's login and consent forms. Nothing
//! calls the server's internals.
//!
//! Opt-in (`RUNEWARP_TEST_EXTERNAL=1`): needs `node` and
//! `npm ci --prefix tests/oidc` (.ci/test does both).

mod common;
use common::opt_in;
#[macro_use]
#[path = "common/test_name.rs"]
mod test_name;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::proc::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const CLIENT_SECRET: &str = "test-client-secret-7c1f";

fn enabled(test: &str) -> bool {
    opt_in::enabled(
        opt_in::EXTERNAL,
        test,
        "node with tests/oidc/node_modules (npm ci)",
    )
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

/// The OpenID Provider on a free port, its client's redirect URI being
/// `redirect`; returns it and its issuer URL.
fn start_provider(home: &Home, redirect: &str) -> (Running, String) {
    assert!(
        oidc_dir().join("node_modules/oidc-provider").exists(),
        "run `npm ci --prefix tests/oidc` first"
    );
    let port = free_tcp();
    let mut cmd = Command::new("node");
    cmd.arg(oidc_dir().join("provider.js"))
        .arg(port.to_string())
        .arg(CLIENT_SECRET)
        .arg(redirect)
        .current_dir(oidc_dir());
    let mut provider = Running::spawn_logged(cmd, &home.path().join("provider.log"));
    provider.wait_line(&["listening"], Duration::from_secs(30));
    (provider, format!("http://127.0.0.1:{port}"))
}

/// A control server signing in at `issuer`.
fn start_control(home: &Home, port: u16, issuer: &str, extra: &str) -> Running {
    home.write("oidc-secret", &format!("{CLIENT_SECRET}\n"));
    home.write(
        "control.toml",
        &format!(
            "[control]\nlisten-address = \"127.0.0.1:{port}\"\nhostname = \"localhost\"\n\
             state-dir = \"control-state\"\n{extra}\n\
             [control.oidc]\nissuer = \"{issuer}\"\nclient-id = \"runewarp\"\n\
             client-secret-file = \"oidc-secret\"\nscopes = [\"openid\", \"email\", \"profile\", \"groups\"]\n"
        ),
    );
    let mut control = home.spawn("control", &home.path().join("control.toml"), "control.log");
    control.wait_line(&["control_started"], Duration::from_secs(20));
    control
}

/// `runewarp node up` without a setup key: it prints a login URL and waits.
fn node_up(home: &Home, name: &str, port: u16) -> Running {
    let mut c = home.cmd();
    c.args(["node", "up", "--control"])
        .arg(format!("https://localhost:{port}"))
        .args(["--ca-file", "control-state/tls/server-ca.crt"])
        .args(["--hostname", name, "--state-dir", name]);
    Running::spawn_logged(c, &home.path().join(format!("{name}.log")))
}

/// The login URL a waiting node printed.
fn login_url(node: &mut Running, port: u16) -> String {
    let prefix = format!("https://localhost:{port}/login/");
    let line = node.wait_line(&[&prefix], Duration::from_secs(20));
    line.split_whitespace()
        .find(|w| w.starts_with(&prefix))
        .unwrap()
        .to_string()
}

fn wait_peers(home: &Home, name: &str, want: &[&str]) {
    wait_until(
        &format!("{name} sees {want:?}"),
        Duration::from_secs(15),
        || peers(home, name).is_some_and(|p| p == want),
    );
}

fn enrolment(home: &Home, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(home.path().join(name).join("enrolment.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

// --- the browser -------------------------------------------------------------

/// One HTTP answer.
#[derive(Debug)]
struct Page {
    status: u16,
    url: String,
    location: Option<String>,
    body: String,
}

/// A cookie-keeping HTTP/1.1 client (one connection per request) trusting
/// the control server's CA.
struct Browser {
    tls: Arc<rustls::ClientConfig>,
    /// Cookies per host:port.
    jar: BTreeMap<String, BTreeMap<String, String>>,
}

/// A TLS client configuration trusting the CA in `ca_file`.
fn trusting(ca_file: &Path) -> Arc<rustls::ClientConfig> {
    runewarp::tls::install_crypto_provider();
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    common::tls::client_config(&roots)
}

/// (https, host, port, path and query) of an absolute URL.
fn split_url(url: &str) -> (bool, String, u16, String) {
    let (https, rest) = match url.split_once("://") {
        Some(("https", r)) => (true, r),
        Some(("http", r)) => (false, r),
        _ => panic!("not an absolute http(s) URL: {url}"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap()),
        None => (authority.to_string(), if https { 443 } else { 80 }),
    };
    (https, host, port, path.to_string())
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&body[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        body = &body[end + 2..];
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// The value of attribute `name` in one HTML tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].replace("&amp;", "&"))
}

impl Browser {
    fn new(ca_file: &Path) -> Self {
        Self {
            tls: trusting(ca_file),
            jar: BTreeMap::new(),
        }
    }

    fn request(&mut self, method: &str, url: &str, form: Option<&str>) -> Page {
        let (https, host, port, path) = split_url(url);
        let origin = format!("{host}:{port}");
        let cookies: Vec<String> = self
            .jar
            .get(&origin)
            .map(|j| j.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\nUser-Agent: runewarp-test\r\nAccept: text/html\r\n"
        );
        if !cookies.is_empty() {
            head += &format!("Cookie: {}\r\n", cookies.join("; "));
        }
        let body = form.unwrap_or("");
        if form.is_some() {
            head += &format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        head += "\r\n";
        let tcp = TcpStream::connect((host.as_str(), port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        let read_all = |s: &mut dyn Read, raw: &mut Vec<u8>| {
            let mut buf = [0u8; 16384];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => panic!("reading {url}: {e}"),
                }
            }
        };
        if https {
            let name = ServerName::try_from(host.clone()).unwrap();
            let conn = rustls::ClientConnection::new(self.tls.clone(), name).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body.as_bytes()).unwrap();
            read_all(&mut s, &mut raw);
        } else {
            let mut s = tcp;
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body.as_bytes()).unwrap();
            read_all(&mut s, &mut raw);
        }
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head from {url}"));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut body = raw[split + 4..].to_vec();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap();
        let mut location = None;
        let mut chunked = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "location" => location = Some(v.to_string()),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "set-cookie" => {
                    let pair = v.split(';').next().unwrap_or("");
                    if let Some((name, value)) = pair.split_once('=') {
                        let jar = self.jar.entry(origin.clone()).or_default();
                        let expired = value.is_empty()
                            || v.to_ascii_lowercase().contains("expires=thu, 01 jan 1970");
                        if expired {
                            jar.remove(name.trim());
                        } else {
                            jar.insert(name.trim().to_string(), value.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        if chunked {
            body = dechunk(&body);
        }
        Page {
            status,
            url: url.to_string(),
            location,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Follow redirects from `page` (up to 20).
    fn follow(&mut self, mut page: Page) -> Page {
        for _ in 0..20 {
            let Some(loc) = page
                .location
                .clone()
                .filter(|_| (300..400).contains(&page.status))
            else {
                return page;
            };
            let next = if loc.starts_with("http://") || loc.starts_with("https://") {
                loc
            } else {
                let (https, host, port, _) = split_url(&page.url);
                format!(
                    "{}://{host}:{port}{loc}",
                    if https { "https" } else { "http" }
                )
            };
            page = self.request("GET", &next, None);
        }
        panic!("more than 20 redirects from {}", page.url);
    }

    fn get(&mut self, url: &str) -> Page {
        let p = self.request("GET", url, None);
        self.follow(p)
    }

    /// Submit the page's first form with its hidden fields plus `fields`.
    fn submit(&mut self, page: &Page, fields: &[(&str, &str)]) -> Page {
        let start = page
            .body
            .find("<form")
            .unwrap_or_else(|| panic!("no form at {}: {}", page.url, page.body));
        let form = &page.body[start..];
        let form = &form[..form.find("</form>").unwrap_or(form.len())];
        let tag = &form[..form.find('>').unwrap()];
        let action = attr(tag, "action").unwrap();
        let mut pairs = form_urlencoded::Serializer::new(String::new());
        for input in form.split("<input").skip(1) {
            let tag = &input[..input.find('>').unwrap_or(input.len())];
            if let (Some(n), Some(v)) = (attr(tag, "name"), attr(tag, "value"))
                && !fields.iter().any(|(k, _)| *k == n)
            {
                pairs.append_pair(&n, &v);
            }
        }
        for (k, v) in fields {
            pairs.append_pair(k, v);
        }
        let body = pairs.finish();
        let (https, host, port, _) = split_url(&page.url);
        let url = if action.starts_with("http") {
            action
        } else {
            format!(
                "{}://{host}:{port}{action}",
                if https { "https" } else { "http" }
            )
        };
        let p = self.request("POST", &url, Some(&body));
        self.follow(p)
    }

    /// Open a login URL and sign in as `user` at the provider (login form,
    /// then consent); returns the control server's final page.
    fn sign_in(&mut self, url: &str, user: &str) -> Page {
        let mut page = self.get(url);
        for _ in 0..4 {
            if !page.url.contains("/interaction/") {
                return page;
            }
            assert_eq!(page.status, 200, "{page:?}");
            page = if page.body.contains("name=\"login\"") {
                self.submit(&page, &[("login", user), ("password", "any")])
            } else {
                self.submit(&page, &[])
            };
        }
        page
    }
}

/// Sign `name` in as `user` from a fresh browser; returns the node (still
/// running) and the control server's final page.
fn enrol(home: &Home, port: u16, name: &str, user: &str) -> (Running, Page) {
    let mut node = node_up(home, name, port);
    let url = login_url(&mut node, port);
    let mut browser = Browser::new(&home.path().join("control-state/tls/server-ca.crt"));
    let page = browser.sign_in(&url, user);
    (node, page)
}

/// For an enabled `test`: a home, the control port, the provider and a
/// control server with `extra` in its `[control]` table.
fn setup(test: &str, extra: &str) -> Option<(Home, u16, Running, Running)> {
    if !enabled(test) {
        return None;
    }
    let home = Home::new();
    let port = free_tcp();
    let (provider, issuer) =
        start_provider(&home, &format!("https://localhost:{port}/oidc/callback"));
    let control = start_control(&home, port, &issuer, extra);
    Some((home, port, provider, control))
}

/// Set organisation `org`'s ACL policy to `json` with the admin command.
fn set_policy(home: &Home, org: &str, json: &str) {
    let file = format!("{org}.json");
    home.write(&file, json);
    home.ok(&[
        "control",
        "-c",
        "control.toml",
        "policy",
        "set",
        "--org",
        org,
        &file,
    ]);
}

#[test]
fn sso_places_users_in_their_organisations_and_refuses_what_it_must() {
    let Some((home, port, _provider, _control)) =
        setup(test_name!(), "admins = [\"alice@acme.com\", \"group:ops\"]")
    else {
        return;
    };

    let mut nodes = Vec::new();
    for (name, user) in [
        ("alice", "alice"),
        ("bob", "bob"),
        ("carol", "carol"),
        ("dave", "dave"),
        ("erin", "erin"),
    ] {
        let (node, page) = enrol(&home, port, name, user);
        assert_eq!(page.status, 200, "{name}: {page:?}");
        assert!(page.body.contains("Signed in"), "{name}: {}", page.body);
        assert!(
            page.url
                .starts_with(&format!("https://localhost:{port}/oidc/callback?")),
            "{}",
            page.url
        );
        nodes.push((name, node, page));
    }
    for (name, _, _) in &nodes {
        wait_until(&format!("{name}'s map"), Duration::from_secs(15), || {
            netmap(&home, name).is_some()
        });
    }
    let org = |n: &str| {
        enrolment(&home, n)["organisation"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (n, want) in [
        ("alice", "acme.com"),
        ("bob", "acme.com"),
        ("carol", "globex.com"),
        ("dave", "dave@gmail.com"),
        ("erin", "erin@gmail.com"),
    ] {
        assert_eq!(org(n), want, "{n}'s organisation");
    }
    // Default policy: each user's own devices only.
    for n in ["alice", "bob", "carol", "dave", "erin"] {
        wait_peers(&home, n, &[]);
    }

    // IdP groups in the ACL policy: ops (bob) may reach eng (alice).
    set_policy(
        &home,
        "acme.com",
        r#"{"groups": {"group:eng": [], "group:ops": []},
            "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["group:eng:22"]}]}"#,
    );
    // Everyone in globex may reach everyone: still never an acme device.
    set_policy(
        &home,
        "globex.com",
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    );
    wait_peers(&home, "alice", &["bob"]);
    wait_peers(&home, "bob", &["alice"]);
    let alice_map = netmap(&home, "alice").unwrap();
    assert_eq!(alice_map["filter"][0]["ports"], "22", "{alice_map}");
    wait_peers(&home, "carol", &[]);
    let carol_map = std::fs::read_to_string(home.path().join("carol/netmap.json")).unwrap();
    assert!(
        !carol_map.contains("acme"),
        "globex never learns of acme: {carol_map}"
    );

    // Admins from the config: alice by email, bob through group ops.
    let users = home.ok(&["control", "-c", "control.toml", "users"]);
    let admin_of = |email: &str| {
        users
            .lines()
            .find(|l| l.contains(email))
            .unwrap_or_else(|| panic!("{email} not listed: {users}"))
            .split('\t')
            .nth(4)
            .unwrap()
            .to_string()
    };
    for (email, want) in [
        ("alice@acme.com", "yes"),
        ("bob@acme.com", "yes"),
        ("carol@globex.com", "no"),
        ("dave@gmail.com", "no"),
    ] {
        assert_eq!(admin_of(email), want, "{email} admin");
    }
    assert!(
        users
            .lines()
            .any(|l| l.contains("bob@acme.com") && l.contains("ops")),
        "{users}"
    );

    // A replayed callback (state already used) and a forged state are
    // refused; the used login link is gone.
    let mut browser = Browser::new(&home.path().join("control-state/tls/server-ca.crt"));
    let replay = browser.get(&nodes[0].2.url);
    assert_eq!(replay.status, 400, "{replay:?}");
    assert!(replay.body.contains("Login not recognised"), "{replay:?}");
    let forged = browser.get(&format!(
        "https://localhost:{port}/oidc/callback?code=abc&state=forged"
    ));
    assert_eq!(forged.status, 400, "{forged:?}");
    let (_, mut alice_node, _) = nodes.remove(0);
    alice_node.assert_running();
    let used = alice_node
        .log_text()
        .split_whitespace()
        .find(|w| w.contains("/login/"))
        .unwrap()
        .to_string();
    let again = browser.get(&used);
    assert_eq!(again.status, 404, "{again:?}");

    // An unverified email is refused, in the browser and on the device.
    let (mut mallory, page) = enrol(&home, port, "mallory", "mallory");
    assert_eq!(page.status, 403, "{page:?}");
    assert!(page.body.contains("not verified"), "{}", page.body);
    let (status, _) = mallory.wait_exit(Duration::from_secs(40));
    assert!(!status.success());
    let log = mallory.log_text();
    assert!(log.contains("login refused"), "{log}");
    assert!(!home.path().join("mallory/enrolment.json").exists());

    // A callback naming another issuer (RFC 9207 mix-up) is refused even
    // with the right state.
    let mut node = node_up(&home, "mixup", port);
    let url = login_url(&mut node, port);
    let mut browser = Browser::new(&home.path().join("control-state/tls/server-ca.crt"));
    let to_idp = browser.request("GET", &url, None);
    assert_eq!(to_idp.status, 302, "{to_idp:?}");
    let location = to_idp.location.unwrap();
    let state = location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("state="))
        .unwrap()
        .to_string();
    let page = browser.get(&format!(
        "https://localhost:{port}/oidc/callback?code=abc&state={state}&iss=http%3A%2F%2Fevil.example"
    ));
    assert_eq!(page.status, 403, "{page:?}");
    assert!(page.body.contains("another identity provider"), "{page:?}");
    assert!(!node.wait_exit(Duration::from_secs(40)).0.success());

    // No secret in the server's log.
    let control_log = std::fs::read_to_string(home.path().join("control.log")).unwrap();
    let token = enrolment(&home, "bob")["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!control_log.contains(&token));
    assert!(!control_log.contains(CLIENT_SECRET));
    assert!(!control_log.contains("code="));
}

/// `GET /v1/map` with `token`: the status.
fn map_status(home: &Home, port: u16, token: &str) -> u16 {
    let tls = trusting(&home.path().join("control-state/tls/server-ca.crt"));
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(tls, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "GET /v1/map HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn an_expired_login_gets_401_and_leaves_the_maps_until_the_user_signs_in_again() {
    let Some((home, port, _provider, _control)) = setup(test_name!(), "key-expiry = \"12s\"")
    else {
        return;
    };
    let (mut a, page) = enrol(&home, port, "erin-a", "erin");
    assert_eq!(page.status, 200, "{page:?}");
    let (mut b, page) = enrol(&home, port, "erin-b", "erin");
    assert_eq!(page.status, 200, "{page:?}");
    // The same user's devices see each other.
    wait_peers(&home, "erin-a", &["erin-b"]);
    wait_peers(&home, "erin-b", &["erin-a"]);
    let token_a = enrolment(&home, "erin-a")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let id_b = enrolment(&home, "erin-b")["device_id"].as_i64().unwrap();
    assert_eq!(map_status(&home, port, &token_a), 200);

    // Both keys expire: the API answers 401 and the streams end.
    wait_until("erin-a's key expires", Duration::from_secs(30), || {
        map_status(&home, port, &token_a) == 401
    });
    assert!(!a.wait_exit(Duration::from_secs(20)).0.success());
    assert!(!b.wait_exit(Duration::from_secs(20)).0.success());

    // Signing in again renews erin-b (same key, same device); erin-a,
    // still expired, is not in its map.
    home.ok(&["node", "logout", "--state-dir", "erin-b"]);
    // The new run's URL, not the old one in the same log.
    std::fs::remove_file(home.path().join("erin-b.log")).unwrap();
    let (_b, page) = enrol(&home, port, "erin-b", "erin");
    assert_eq!(page.status, 200, "{page:?}");
    wait_until("erin-b's new map", Duration::from_secs(15), || {
        netmap(&home, "erin-b").is_some()
    });
    assert_eq!(
        enrolment(&home, "erin-b")["device_id"].as_i64().unwrap(),
        id_b
    );
    wait_peers(&home, "erin-b", &[]);
    assert_eq!(map_status(&home, port, &token_a), 401);
}

/// One sign-in through a real headless Chromium: the provider's login
/// and consent pages, then the control server's page.
#[test]
fn chromium_signs_a_device_in() {
    let test = test_name!();
    if !enabled(test) || !common::webdriver::installed(test) {
        return;
    }
    let Some((home, port, _provider, _control)) = setup(test, "") else {
        return;
    };
    let mut node = node_up(&home, "carol", port);
    let url = login_url(&mut node, port);
    let wd = common::webdriver::WebDriver::start("localhost");
    wd.goto(&url);
    wd.wait_for_text("name=\"login\"");
    wd.type_into("input[name=login]", "carol");
    wd.type_into("input[name=password]", "any");
    wd.click("button[type=submit]");
    wd.wait_for_text("name=\"prompt\" value=\"consent\"");
    wd.click("button[type=submit]");
    wd.wait_for_text("Signed in as carol@globex.com");
    assert!(
        wd.url()
            .starts_with(&format!("https://localhost:{port}/oidc/callback?")),
        "{}",
        wd.url()
    );
    wd.screenshot("control-sso-signed-in.png");
    wait_until("carol's map", Duration::from_secs(15), || {
        netmap(&home, "carol").is_some()
    });
    assert_eq!(enrolment(&home, "carol")["organisation"], "globex.com");
}
