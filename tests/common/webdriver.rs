//! A blocking W3C WebDriver client for chromedriver with one headless
//! Chromium session (Debian `chromium` + `chromium-driver`), for tests that
//! click through a sign-in in a real browser (tests/gate.rs,
//! tests/control_oidc.rs). Screenshots go to $RUNEWARP_GATE_SCREENSHOTS
//! when set.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::ports::free_tcp;
use super::proc::{wait_for, wait_until};

/// Whether chromium and chromedriver are on PATH; if not, one skip line
/// for `test`.
pub fn installed(test: &str) -> bool {
    for program in ["chromium", "chromedriver"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()));
        if !found {
            eprintln!(
                "SKIPPED {test}: {program} is not installed (apt-get install chromium chromium-driver)"
            );
            return false;
        }
    }
    true
}

/// chromedriver with one headless Chromium session.
pub struct WebDriver {
    child: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl WebDriver {
    /// Start chromedriver and a session; `app_host` resolves to loopback.
    pub fn start(app_host: &str) -> WebDriver {
        let port = free_tcp();
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs");
        let profile = tempfile::tempdir().unwrap();
        let mut wd = WebDriver {
            child,
            port,
            session: String::new(),
            _profile: profile,
        };
        wait_until("chromedriver answering", Duration::from_secs(30), || {
            wd.call("GET", "/status", None).is_ok()
        });
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-proxy-server",
                    "--window-size=900,640",
                    format!("--user-data-dir={}", wd._profile.path().display()),
                    format!("--host-resolver-rules=MAP {app_host} 127.0.0.1"),
                ],
            },
        }}});
        let created = wd.call("POST", "/session", Some(caps)).expect("session");
        wd.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        wd
    }

    /// One WebDriver command; its `value`.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> std::io::Result<serde_json::Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        // chromedriver keeps the connection open: read the head, then
        // exactly Content-Length bytes.
        let mut reader = BufReader::new(s);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("connection closed in the head"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().map_err(std::io::Error::other)?;
            }
        }
        let mut raw = vec![0u8; length];
        reader.read_exact(&mut raw)?;
        let json: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        if json["value"]["error"].is_string() {
            return Err(std::io::Error::other(json["value"].to_string()));
        }
        Ok(json["value"].clone())
    }

    pub fn cmd(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method == "POST").then_some(body);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", serde_json::json!({ "url": url }));
    }

    pub fn find(&self, css: &str) -> String {
        let found = self.cmd(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": css}),
        );
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            serde_json::json!({ "text": text }),
        );
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{id}/click"),
            serde_json::json!({}),
        );
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", serde_json::Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn source(&self) -> String {
        self.cmd("GET", "/source", serde_json::Value::Null)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Wait until the page source contains `text`.
    pub fn wait_for_text(&self, text: &str) {
        wait_for(Duration::from_secs(30), || {
            let source = self.source();
            if source.contains(text) {
                Ok(())
            } else {
                Err(format!(
                    "{text:?} not on {} within 30 s:\n{source}",
                    self.url()
                ))
            }
        })
    }

    /// Save a PNG of the page as `name` under $RUNEWARP_GATE_SCREENSHOTS.
    pub fn screenshot(&self, name: &str) {
        use base64::Engine;
        let data = self.cmd("GET", "/screenshot", serde_json::Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap_or_default())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = std::env::var_os("RUNEWARP_GATE_SCREENSHOTS") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(Path::new(&dir).join(name), png).unwrap();
        }
    }
}
