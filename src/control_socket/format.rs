//! `status` for people: the JSON document an instance answers, as a few
//! lines of text. (`--json` prints the document itself.)

use std::fmt::Write;

use serde_json::Value;

/// Render a status document (`role` server or client) as text.
pub(crate) fn human(v: &Value, now: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "runewarp {} {}, pid {}, up {}",
        s(&v["role"]),
        s(&v["version"]),
        n(&v["pid"]),
        duration(n(&v["uptime_s"]))
    );
    match v["role"].as_str() {
        Some("server") => server(&mut out, v),
        Some("client") => client(&mut out, v),
        _ => {
            let _ = writeln!(out, "(unknown document: {v})");
        }
    }
    certificates(&mut out, v, now);
    out
}

fn server(out: &mut String, v: &Value) {
    let _ = writeln!(out, "server hostname {}", s(&v["hostname"]));
    let dropped = v["visitors"]["dropped"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, c)| format!("{k} {}", n(c)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "visitors: {} accepted, {} dropped{}",
        n(&v["visitors"]["accepted"]),
        v["visitors"]["dropped"]
            .as_object()
            .map(|m| m.values().map(n).sum::<u64>())
            .unwrap_or(0),
        if dropped.is_empty() {
            String::new()
        } else {
            format!(" ({dropped})")
        }
    );
    for t in v["tunnels"].as_array().into_iter().flatten() {
        let _ = writeln!(out);
        let state = match t["state"].as_str() {
            Some("connected") => format!(
                "connected from {} for {}",
                s(&t["peer"]),
                duration(n(&t["connected_s"]))
            ),
            _ => "not connected".to_string(),
        };
        let _ = writeln!(out, "tunnel {}: {state}", s(&t["name"]));
        let _ = writeln!(out, "  hostnames: {}", list(&t["hostnames"]));
        if let Some(id) = t["identity"].as_str() {
            let _ = writeln!(out, "  identity:  {id}");
        } else {
            let _ = writeln!(out, "  pins:      {}", list(&t["identities"]));
        }
        let rest = format!(
            "{} connections, {} replaced",
            n(&t["connections"]),
            n(&t["replaced"])
        );
        let ways = [
            ("bytes_to_client", "to client"),
            ("bytes_to_visitor", "to visitors"),
        ];
        streams(out, t, ways, &rest);
    }
}

fn client(out: &mut String, v: &Value) {
    let _ = writeln!(
        out,
        "server {}, identity {}",
        s(&v["server"]),
        s(&v["identity"])
    );
    let t = &v["tunnel"];
    let line = match t["state"].as_str() {
        Some("connected") => format!(
            "connected to {} for {}, rtt {:.1} ms{}",
            s(&t["peer"]),
            duration(n(&t["connected_s"])),
            t["rtt_ms"].as_f64().unwrap_or(0.0),
            path_line(&t["path"])
        ),
        Some("waiting") => format!(
            "not connected: {} ({}); next attempt in {}",
            s(&t["waiting"]["reason"]),
            s(&t["waiting"]["detail"]),
            duration(n(&t["waiting"]["retry_in_s"]))
        ),
        _ => "connecting".to_string(),
    };
    let _ = writeln!(
        out,
        "tunnel: {line}; {} connections so far",
        n(&t["connections"])
    );
    for svc in v["services"].as_array().into_iter().flatten() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "service {}: {} to {}",
            s(&svc["name"]),
            s(&svc["tls_mode"]),
            s(&svc["backend"])
        );
        let _ = writeln!(out, "  hostnames: {}", list(&svc["hostnames"]));
        let rest = format!("{} backend failures", n(&svc["backend_failures"]));
        let ways = [
            ("bytes_to_backend", "to backend"),
            ("bytes_from_backend", "from backend"),
        ];
        streams(out, svc, ways, &rest);
    }
}

/// The `streams:` line of a Tunnel or a Service: streams in flight and in
/// all, the bytes of each of `ways` (its key, its words), then `rest`.
fn streams(out: &mut String, v: &Value, ways: [(&str, &str); 2], rest: &str) {
    let [(a, a_words), (b, b_words)] = ways;
    let _ = writeln!(
        out,
        "  streams:   {} active, {} total; {} {a_words}, {} {b_words}; {rest}",
        n(&v["streams_active"]),
        n(&v["streams_total"]),
        bytes(n(&v[a])),
        bytes(n(&v[b])),
    );
}

fn certificates(out: &mut String, v: &Value, now: u64) {
    let certs = v["certificates"].as_array().cloned().unwrap_or_default();
    if certs.is_empty() {
        return;
    }
    let _ = writeln!(out);
    for c in certs {
        let at = c["not_after"].as_i64().unwrap_or(0);
        let left = at - now as i64;
        let when = if left >= 0 {
            format!("in {}", duration(left as u64))
        } else {
            format!("EXPIRED {} ago", duration(left.unsigned_abs()))
        };
        let _ = writeln!(
            out,
            "certificate {} expires {} ({when})",
            s(&c["hostname"]),
            date(at)
        );
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(t) => t.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "(catch-all)".to_string())
}

/// `3d 4h`, `1h 2m`, `5m 3s`, `42s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// `1.5 MiB`, `512 B`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `2027-03-01 12:00 UTC` from Unix seconds.
pub(crate) fn date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60
    )
}

/// `; lost L of S packets (E congestion events), window W bytes, MTU M`
/// for a connected Tunnel's path, or nothing.
fn path_line(p: &Value) -> String {
    if p.is_null() {
        return String::new();
    }
    format!(
        "; lost {} of {} packets ({} congestion events), window {} bytes, MTU {}",
        n(&p["lost_packets"]),
        n(&p["sent_packets"]),
        n(&p["congestion_events"]),
        n(&p["congestion_window"]),
        n(&p["mtu"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_durations_and_sizes_read_well() {
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
        assert_eq!(date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(date(1_798_761_600 + 3661), "2027-01-01 01:01 UTC");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(3723), "1h 2m");
        assert_eq!(duration(90 * 86_400 + 7200), "90d 2h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn a_server_document_reads_as_text() {
        let v = serde_json::json!({
            "role": "server", "version": "0.1.0", "pid": 7, "uptime_s": 65,
            "hostname": "edge.example.com",
            "visitors": {"accepted": 10, "dropped": {"unknown_hostname": 2}},
            "tunnels": [{"name": "app.example.com", "hostnames": ["app.example.com"],
                "state": "connected", "peer": "192.0.2.1:4000", "connected_s": 60,
                "identity": "ab", "streams_active": 1, "streams_total": 8,
                "bytes_to_client": 2048, "bytes_to_visitor": 10, "connections": 1, "replaced": 0}],
            "certificates": [{"hostname": "edge.example.com", "not_after": 1000 + 86_400 * 3}],
        });
        let text = human(&v, 1000);
        assert!(
            text.contains("runewarp server 0.1.0, pid 7, up 1m 5s"),
            "{text}"
        );
        assert!(
            text.contains("visitors: 10 accepted, 2 dropped (unknown_hostname 2)"),
            "{text}"
        );
        assert!(
            text.contains("tunnel app.example.com: connected from 192.0.2.1:4000 for 1m 0s"),
            "{text}"
        );
        assert!(
            text.contains(
                "  streams:   1 active, 8 total; 2.0 KiB to client, 10 B to visitors; 1 connections, 0 replaced\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("expires 1970-01-04 00:16 UTC (in 3d 0h)"),
            "{text}"
        );
    }

    #[test]
    fn a_client_document_reads_as_text() {
        let v = serde_json::json!({
            "role": "client", "version": "0.1.0", "pid": 7, "uptime_s": 5,
            "server": "edge.example.com:443", "identity": "ab",
            "tunnel": {"state": "connecting", "connections": 0},
            "services": [{"name": "catch-all", "tls_mode": "passthrough",
                "backend": "127.0.0.1:8080", "hostnames": [], "streams_active": 2,
                "streams_total": 3, "bytes_to_backend": 1536, "bytes_from_backend": 4,
                "backend_failures": 1}],
        });
        let text = human(&v, 1000);
        assert!(
            text.contains("service catch-all: passthrough to 127.0.0.1:8080\n  hostnames: (catch-all)\n  streams:   2 active, 3 total; 1.5 KiB to backend, 4 B from backend; 1 backend failures\n"),
            "{text}"
        );
    }
}
