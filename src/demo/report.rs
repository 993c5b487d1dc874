//! The demo's printed report and the `--keep-running` instructions.

use std::path::Path;
use std::time::Duration;

use super::backend::Arrival;
use super::visitor::{self, CertificateSummary};
use super::{
    GATED_DOMAIN, GATED_HOSTNAME, Holder, Hop, Live, Overview, PASSTHROUGH_HOSTNAME,
    SERVER_HOSTNAME, TERMINATE_HOSTNAME,
};
use crate::config::TlsMode;

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn holder_name(h: Holder) -> &'static str {
    match h {
        Holder::LocalBackend => "Local backend",
        Holder::ClientInstance => "Client instance",
    }
}

fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Passthrough => "passthrough",
        TlsMode::Terminate => "terminate",
    }
}

/// Two lines for a certificate: its SHA-256 under `label`, then its file
/// and what it is for.
fn fingerprint(label: &str, der: &[u8], file: &str, purpose: &str) {
    println!(
        "  {label:<27}SHA-256 {}",
        crate::tls::material::fingerprint_sha256(der)
    );
    println!("{:29}{file}: {purpose}", "");
}

/// A path inside the demo directory, shown relative to it.
fn rel<'a>(dir: &Path, path: &'a Path) -> std::borrow::Cow<'a, str> {
    path.strip_prefix(dir).unwrap_or(path).to_string_lossy()
}

pub fn print(o: &Overview<'_>, hops: &[Hop]) {
    let m = o.material;
    let server_leaf = visitor::summarize(&m.server_leaf).ok();
    println!();
    println!("Material (throw-away, in {})", o.dir.display());
    fingerprint(
        "Server CA (private)",
        &m.server_ca,
        &rel(o.dir, &m.server_ca_file),
        "the Client trusts only this CA for the Tunnel",
    );
    if let Some(leaf) = &server_leaf {
        println!(
            "  Server certificate         {} (SAN {}), issued by {}",
            leaf.subject,
            leaf.dns_names.join(", "),
            leaf.issuer
        );
    }
    println!("  Client identity (pin)      {}", m.client_pin);
    println!(
        "                             SHA-256 of the Client's Ed25519 public key; pinned by the Server's Tunnel"
    );
    fingerprint(
        "Public hostname CA",
        &m.public_ca,
        &rel(o.dir, &m.public_ca_file),
        "Visitors of terminate Services trust this",
    );
    fingerprint(
        "Local backend certificate",
        &m.backend_cert,
        &rel(o.dir, &m.backend_cert_file),
        "self-signed, its key never leaves the TLS Local backend",
    );

    println!();
    println!("Addresses (loopback only, ports chosen by the OS)");
    println!(
        "  Server public listener     {:<22} TCP   Visitors connect here; the Server reads only the SNI",
        o.public
    );
    println!(
        "  Server tunnel listener     {:<22} UDP   QUIC, ALPN runewarp/1, Server hostname {SERVER_HOSTNAME}",
        o.tunnel
    );
    println!(
        "  Client instance            {:<22} UDP   dialed {SERVER_HOSTNAME}:{}; Tunnel up after {}, pin {}... accepted",
        o.tunnel_info.peer,
        o.tunnel.port(),
        ms(o.tunnel_info.after),
        &o.tunnel_info.pin[..16.min(o.tunnel_info.pin.len())]
    );
    println!(
        "  TLS Local backend          {:<22} TCP   {PASSTHROUGH_HOSTNAME} (passthrough)",
        o.tls_backend
    );
    println!(
        "  Plaintext Local backend    {:<22} TCP   {TERMINATE_HOSTNAME} (terminate)",
        o.plain_backend
    );

    for (i, hop) in hops.iter().enumerate() {
        print_hop(i + 1, o, hop);
    }

    println!();
    let all_ok = hops
        .iter()
        .all(|h| h.visit.status_line.split(' ').nth(1) == Some("200"));
    if all_ok {
        println!(
            "Result: both Visitor requests were answered 200 OK. In passthrough the Visitor's TLS ended at the"
        );
        println!(
            "Local backend; in terminate it ended at the Client instance, which forwarded plaintext."
        );
    }
}

fn print_hop(n: usize, o: &Overview<'_>, hop: &Hop) {
    let v = &hop.visit;
    println!();
    println!(
        "Hop {n}: https://{}/   tls-mode = \"{}\"",
        hop.hostname,
        mode_name(hop.mode)
    );
    println!(
        "  Path         Visitor -> Server {} -> Tunnel (QUIC) -> Client instance -> Local backend {}",
        o.public, hop.backend
    );
    let tls_span = match hop.mode {
        TlsMode::Passthrough => {
            "TLS from the Visitor to the Local backend; the Server and the Client instance read only the SNI"
        }
        TlsMode::Terminate => {
            "TLS from the Visitor to the Client instance, plaintext from there to the Local backend"
        }
    };
    println!("               {tls_span}");
    print_certificate(&v.certificate);
    let holder_note = match hop.holder {
        Holder::LocalBackend => "the Server and the Client instance only relayed encrypted bytes",
        Holder::ClientInstance => "from public-certs/; the Local backend never sees TLS",
    };
    println!(
        "               held by  {} ({holder_note})",
        holder_name(hop.holder)
    );
    println!(
        "  TLS          {}, {}, ALPN {}{}",
        v.tls_version,
        v.cipher_suite,
        v.alpn.as_deref().unwrap_or("none"),
        if v.clean_close {
            ""
        } else {
            ", closed without close_notify"
        }
    );
    let first = hop
        .seen
        .first_byte
        .map(|b| format!("0x{b:02x}"))
        .unwrap_or_else(|| "-".into());
    let line = hop.seen.request_line.as_deref().unwrap_or("-");
    match hop.seen.arrival {
        Arrival::Tls => println!(
            "  Backend saw  TLS from {} (first byte {first}, the Visitor's ClientHello); after decrypting: {line:?}",
            hop.seen.peer
        ),
        Arrival::Plaintext => println!(
            "  Backend saw  plaintext from {} (first byte {first}): {line:?}",
            hop.seen.peer
        ),
        Arrival::Unreadable => println!(
            "  Backend saw  unreadable bytes from {} (first byte {first})",
            hop.seen.peer
        ),
    }
    println!("  Status       {}", v.status_line);
    println!(
        "  Bytes        HTTP {} B sent / {} B received; on the wire (TLS) {} B sent / {} B received",
        v.request_bytes, v.response_bytes, v.wire_sent, v.wire_received
    );
    println!(
        "  Time         TCP connect {}, TLS handshake {}, total {}",
        ms(v.connect),
        ms(v.handshake),
        ms(v.total)
    );
    let mut body = v.body.lines();
    if let Some(first) = body.next() {
        println!("  Body         | {first}");
        for l in body {
            println!("               | {l}");
        }
    }
}

fn print_certificate(c: &CertificateSummary) {
    println!("  Certificate  subject  {}", c.subject);
    println!("               SAN      {}", c.dns_names.join(", "));
    println!(
        "               issuer   {}{}",
        c.issuer,
        if c.self_signed { " (self-signed)" } else { "" }
    );
    println!("               expires  {}", c.not_after);
    println!("               SHA-256  {}", c.fingerprint);
}

/// `--keep-running`: how to try it by hand.
pub(crate) fn keep_running(live: &Live, dir: &Path) {
    let port = live.public.port();
    let ip = live.public.ip();
    println!();
    println!(
        "Everything keeps running (--keep-running). Material: {}",
        dir.display()
    );
    println!("Try it with curl (each command trusts only the certificate that hop presents):");
    println!();
    println!("  # passthrough: TLS ends at the Local backend");
    println!(
        "  curl --cacert {} --resolve {PASSTHROUGH_HOSTNAME}:{port}:{ip} https://{PASSTHROUGH_HOSTNAME}:{port}/",
        shell_quote(&live.passthrough_trust)
    );
    println!();
    println!("  # terminate: TLS ends at the Client instance, the Local backend gets plaintext");
    println!(
        "  curl --cacert {} --resolve {TERMINATE_HOSTNAME}:{port}:{ip} https://{TERMINATE_HOSTNAME}:{port}/",
        shell_quote(&live.terminate_trust)
    );
    println!();
    println!(
        "  # terminate + Runegate: sign in from your own browser with any address @{GATED_DOMAIN};"
    );
    println!("  # the sign-in mail (link and code) is printed here by the demo's mail catcher");
    println!(
        "  chromium --host-resolver-rules='MAP {GATED_HOSTNAME} {ip}' --ignore-certificate-errors {}/",
        super::gated_base_url(live.public)
    );
    println!(
        "  #   (or map {GATED_HOSTNAME} to {ip} in /etc/hosts and trust {})",
        shell_quote(&live.terminate_trust)
    );
    println!();
    println!("Press Ctrl-C (or send SIGTERM) to stop and remove the directory.");
}

/// The gated hop: without a session the Visitor got the sign-in page, and
/// its sign-in request produced the mail printed above.
pub fn gated(hostname: &str, visit: &super::gate::GatedVisit) {
    println!();
    println!("  Visitor -> {hostname} (terminate, behind Runegate)");
    println!("    GET /dashboard     {}", visit.status);
    println!(
        "                       the gate's sign-in page: no session, so the Local backend saw nothing"
    );
    println!(
        "    sign-in request    {} (for {}; the mail catcher printed the mail above)",
        visit.asked,
        super::gate::VISITOR_EMAIL
    );
}

fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_'));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
