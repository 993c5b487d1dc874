//! The demo's gated Service: a built-in mail catcher (just enough SMTP on
//! loopback for the gate's mailer) that prints every sign-in mail to the
//! terminal, and a Visitor check that the gated hostname answers with the
//! sign-in page. With `--keep-running` a person signs in from their own
//! browser, reading the link and code here.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::BoxError;

/// Longest line or message the catcher accepts.
const MAX_LINE: usize = 4096;
const MAX_MESSAGE: usize = 256 * 1024;
/// A mail session idle this long is dropped.
const SESSION_IDLE: Duration = Duration::from_secs(30);

/// The mail catcher: listening until dropped. The demo prints each mail;
/// the gate bench reads them with [`MailCatcher::mails`].
pub struct MailCatcher {
    /// The SMTP address it listens on.
    pub addr: SocketAddr,
    /// Mails caught so far.
    pub caught: Arc<std::sync::atomic::AtomicUsize>,
    mails: Arc<std::sync::Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for MailCatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MailCatcher {
    /// Listen on loopback; print every mail when `print`.
    pub async fn start(print: bool) -> Result<Self, BoxError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let caught = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mails = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (counter, kept) = (caught.clone(), mails.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (counter, kept) = (counter.clone(), kept.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(Some(mail))) =
                        tokio::time::timeout(SESSION_IDLE * 4, session(tcp)).await
                    {
                        if print {
                            print_mail(&mail);
                        }
                        kept.lock().unwrap_or_else(|p| p.into_inner()).push(mail);
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Self {
            addr,
            caught,
            mails,
            task,
        })
    }

    /// The mails caught so far, quoted-printable soft breaks and `=3D`
    /// undone.
    pub fn mails(&self) -> Vec<String> {
        self.mails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|m| unfold(m))
            .collect()
    }
}

fn unfold(mail: &str) -> String {
    mail.replace("=\n", "").replace("=3D", "=")
}

/// One SMTP session; the message it carried, if any.
async fn session(tcp: TcpStream) -> std::io::Result<Option<String>> {
    let (read, mut write) = tcp.into_split();
    let mut lines = BufReader::new(read.take(MAX_MESSAGE as u64 * 2));
    let mut mail = None;
    reply(&mut write, "220 runewarp-demo mail catcher").await?;
    loop {
        let Some(line) = read_line(&mut lines).await? else {
            return Ok(mail);
        };
        let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" | "HELO" => reply(&mut write, "250 runewarp-demo").await?,
            "DATA" => {
                reply(&mut write, "354 end with <CRLF>.<CRLF>").await?;
                let mut text = String::new();
                loop {
                    let Some(l) = read_line(&mut lines).await? else {
                        return Ok(None);
                    };
                    if l == "." {
                        break;
                    }
                    if text.len() + l.len() > MAX_MESSAGE {
                        return Ok(None);
                    }
                    text.push_str(l.strip_prefix('.').unwrap_or(&l));
                    text.push('\n');
                }
                mail = Some(text);
                reply(&mut write, "250 caught").await?;
            }
            "QUIT" => {
                reply(&mut write, "221 bye").await?;
                return Ok(mail);
            }
            _ => reply(&mut write, "250 ok").await?,
        }
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(SESSION_IDLE, r.read_until(b'\n', &mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if n == 0 || buf.len() > MAX_LINE {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> std::io::Result<()> {
    w.write_all(format!("{line}\r\n").as_bytes()).await
}

/// The mail's recipient and text part, quoted-printable undone, framed.
fn print_mail(mail: &str) {
    let unfolded = unfold(mail);
    let (head, body) = unfolded.split_once("\n\n").unwrap_or(("", &unfolded));
    let to = head
        .lines()
        .find_map(|l| l.strip_prefix("To: "))
        .unwrap_or("-");
    println!();
    println!("  ---- mail caught by the demo's mail catcher (to {to}) ----");
    for line in body.lines() {
        println!("  | {line}");
    }
    println!("  ----");
}

/// The demo Visitor's address for the sign-in request.
pub const VISITOR_EMAIL: &str = "visitor@example.com";

/// What the Visitor saw at the gated hostname.
pub struct GatedVisit {
    /// Status line of `GET /dashboard` without a session.
    pub status: String,
    /// Whether that answer was the gate's sign-in page.
    pub sign_in_page: bool,
    /// Status line of the sign-in request for [`VISITOR_EMAIL`].
    pub asked: String,
}

/// Without a session, `GET /dashboard` must give the sign-in page; then ask
/// for a link for [`VISITOR_EMAIL`] as a browser would (state cookie and
/// CSRF token from that page), so the catcher prints the mail.
pub async fn visit_gated(
    public: SocketAddr,
    hostname: &str,
    trust: &CertificateDer<'static>,
) -> Result<GatedVisit, BoxError> {
    let port = public.port();
    let page = request(
        public,
        hostname,
        trust,
        format!("GET /dashboard HTTP/1.1\r\nHost: {hostname}:{port}\r\nConnection: close\r\n\r\n"),
    )
    .await?;
    let status = page.lines().next().unwrap_or("").to_string();
    let sign_in_page = page.contains("Send sign-in link");
    let cookie = page
        .lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .filter_map(|c| c.split(';').next())
        .find(|c| c.starts_with(crate::gate::server::STATE_COOKIE))
        .ok_or("the sign-in page set no state cookie")?
        .to_string();
    let field = |name: &str| -> Result<String, BoxError> {
        let key = format!("name=\"{name}\" value=\"");
        let at = page.find(&key).ok_or(format!("no {name} field"))? + key.len();
        let end = page[at..].find('"').ok_or("unterminated field")? + at;
        Ok(page[at..end].replace("&amp;", "&"))
    };
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("email", VISITOR_EMAIL)
        .append_pair("csrf", &field("csrf")?)
        .append_pair("next", &field("next")?)
        .finish();
    let answer = request(
        public,
        hostname,
        trust,
        format!(
            "POST /_runewarp/gate/sign-in HTTP/1.1\r\nHost: {hostname}:{port}\r\nCookie: {cookie}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await?;
    Ok(GatedVisit {
        status,
        sign_in_page,
        asked: answer.lines().next().unwrap_or("").to_string(),
    })
}

/// One request over a fresh TLS connection; the whole answer.
async fn request(
    public: SocketAddr,
    hostname: &str,
    trust: &CertificateDer<'static>,
    raw: String,
) -> Result<String, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(public).await?;
    let mut tls = connector
        .connect(ServerName::try_from(hostname.to_string())?, tcp)
        .await?;
    tls.write_all(raw.as_bytes()).await?;
    let mut response = Vec::new();
    if let Err(e) = tls.read_to_end(&mut response).await
        && response.is_empty()
    {
        return Err(format!("reading the answer: {e}").into());
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}
