//! Sign-in mails over SMTP with lettre (async, rustls). A failed send is
//! logged with the SMTP reply; the Visitor always sees the same neutral
//! page, so nothing about the address leaks.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::config::{SmtpConfig, SmtpTls};

/// How long one delivery attempt may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot read gate.smtp.password-file {path}: {source}")]
    Password {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read gate.smtp.ca-file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("gate.smtp: {0}")]
    Setup(String),
}

impl Mailer {
    /// Build the transport; reads `password-file` (never logged).
    pub fn new(c: &SmtpConfig) -> Result<Self, MailError> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(c.host.as_str())
            .port(c.port)
            .timeout(Some(SEND_TIMEOUT));
        let extra_roots =
            match &c.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|source| MailError::CaFile {
                        path: path.display().to_string(),
                        source,
                    })?;
                    vec![Certificate::from_pem(&pem).map_err(|e| {
                        MailError::Setup(format!("ca-file {}: {e}", path.display()))
                    })?]
                }
                None => Vec::new(),
            };
        let params = || {
            let mut b = TlsParameters::builder(c.host.clone());
            for root in &extra_roots {
                b = b.add_root_certificate(root.clone());
            }
            b.build_rustls()
                .map_err(|e| MailError::Setup(e.to_string()))
        };
        builder = builder.tls(match c.tls {
            SmtpTls::StartTls => Tls::Required(params()?),
            SmtpTls::Implicit => Tls::Wrapper(params()?),
            SmtpTls::None => Tls::None,
        });
        if let Some(creds) = &c.credentials {
            let password = std::fs::read_to_string(&creds.password_file).map_err(|source| {
                MailError::Password {
                    path: creds.password_file.display().to_string(),
                    source,
                }
            })?;
            let password = password.trim_end_matches(['\r', '\n']).to_string();
            builder = builder.credentials(Credentials::new(creds.username.clone(), password));
        }
        let from: Mailbox = c
            .from
            .to_string()
            .parse()
            .map_err(|e| MailError::Setup(format!("from {:?}: {e}", c.from.to_string())))?;
        Ok(Mailer {
            transport: builder.build(),
            from,
        })
    }

    /// Send the sign-in mail; errors come back as one loggable line
    /// (including the SMTP reply, never the link or code).
    pub async fn send_sign_in(
        &self,
        to: &str,
        site: &str,
        link: &str,
        code: &str,
        valid_for: Duration,
    ) -> Result<(), String> {
        let to: Mailbox = to.parse().map_err(|e| format!("recipient: {e}"))?;
        let minutes = valid_for.as_secs().div_ceil(60);
        let body = format!(
            "Someone (hopefully you) asked to sign in to {site}.\r\n\r\n\
Open this link in the same browser to sign in:\r\n{link}\r\n\r\n\
Or type this code into the waiting page: {code}\r\n\r\n\
The link and the code work once, within {minutes} min. If you did not ask, ignore this mail.\r\n"
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("Sign in to {site}"))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| format!("building the message: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
