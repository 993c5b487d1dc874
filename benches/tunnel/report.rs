//! Prints the figures with their ratios against direct and the targets.

use super::*;

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

pub(crate) fn both(pt: bool, tm: bool) -> String {
    format!("pt {} / tm {}", verdict(pt), verdict(tm))
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn ratio(x: f64, base: f64) -> String {
    format!("{x:.1} ({:.2})", x / base)
}

/// A row of what the benchmark's own processes (Visitors and backend)
/// spent with direct, passthrough and terminate: a reference, no target.
fn reference(row: &mut impl FnMut([&str; 6]), label: &str, of: [f64; 3], decimals: usize) {
    let [d, p, t] = of.map(|x| format!("{x:.decimals$}"));
    row([label, &d, &p, &t, "(reference)", "-"]);
}

/// The Server's and then the Client's row of one figure, "{label}: Server"
/// and "{label}: Client": `cells` gives the passthrough and terminate
/// cells and the verdict for the Server (true) or the Client (false).
fn per_role(
    row: &mut impl FnMut([&str; 6]),
    label: &str,
    target: &str,
    cells: impl Fn(bool) -> [String; 3],
) {
    for (who, server) in [("Server", true), ("Client", false)] {
        let [pt, tm, verdict] = cells(server);
        row([&format!("{label}: {who}"), "-", &pt, &tm, target, &verdict]);
    }
}

pub(crate) fn report(plan: &Plan, o: &Outcome) {
    let [d, p, t] = &o.figures;
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut row = |cells: [&str; 6]| rows.push(cells.map(str::to_string));
    let dash = "-";

    let title = format!(
        "runewarp bench (loopback, {} cores{})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if plan.quick { ", QUICK" } else { "" }
    );
    row([
        &title,
        "direct",
        "passthrough (ratio)",
        "terminate (ratio)",
        "target",
        "verdict",
    ]);
    let min_ratio = 0.6;
    row([
        "single-stream download MB/s",
        &format!("{:.1}", d.single_dl),
        &ratio(p.single_dl, d.single_dl),
        &ratio(t.single_dl, d.single_dl),
        "pt >= 0.60x direct",
        verdict(p.single_dl / d.single_dl >= min_ratio),
    ]);
    row([
        "single-stream upload MB/s",
        &format!("{:.1}", d.single_ul),
        &ratio(p.single_ul, d.single_ul),
        &ratio(t.single_ul, d.single_ul),
        dash,
        dash,
    ]);
    row([
        &format!("{}-stream aggregate download MB/s", plan.streams),
        &format!("{:.1}", d.multi_dl),
        &ratio(p.multi_dl, d.multi_dl),
        &ratio(t.multi_dl, d.multi_dl),
        dash,
        dash,
    ]);
    let added = |x: &Figures| x.lat_p50 - d.lat_p50;
    row([
        "new-conn latency p50 ms (added)",
        &format!("{:.3}", d.lat_p50),
        &format!("{:.3} (+{:.3})", p.lat_p50, added(p)),
        &format!("{:.3} (+{:.3})", t.lat_p50, added(t)),
        "added p50 < 0.5 ms",
        &both(added(p) < 0.5, added(t) < 0.5),
    ]);
    row([
        "new-conn latency p99 ms",
        &format!("{:.3}", d.lat_p99),
        &format!("{:.3}", p.lat_p99),
        &format!("{:.3}", t.lat_p99),
        dash,
        dash,
    ]);
    row([
        &format!("new conns/s, {} concurrent", plan.rate_workers),
        &format!("{:.0}", d.conn_rate),
        &format!("{:.0} ({:.2})", p.conn_rate, p.conn_rate / d.conn_rate),
        &format!("{:.0} ({:.2})", t.conn_rate, t.conn_rate / d.conn_rate),
        ">= 0.90x direct",
        &both(
            p.conn_rate / d.conn_rate >= 0.9,
            t.conn_rate / d.conn_rate >= 0.9,
        ),
    ]);
    let per_conn = |x: &Figures| x.cpu_per_conn.server + x.cpu_per_conn.client;
    row([
        "CPU ms/conn in rate: Server+Client",
        dash,
        &format!(
            "{:.3} ({:.3}+{:.3})",
            per_conn(p),
            p.cpu_per_conn.server,
            p.cpu_per_conn.client
        ),
        &format!(
            "{:.3} ({:.3}+{:.3})",
            per_conn(t),
            t.cpu_per_conn.server,
            t.cpu_per_conn.client
        ),
        dash,
        dash,
    ]);
    reference(
        &mut row,
        "CPU ms/conn in rate: bench (Vis+backend)",
        [d, p, t].map(|x| x.cpu_per_conn.bench),
        3,
    );
    let gb_cell = |x: &Figures, server: bool| {
        let cpu = x.cpu_per_gb;
        format!("{:.2}", if server { cpu.server } else { cpu.client })
    };
    per_role(&mut row, "CPU s/GB 1-stream dl", dash, |server| {
        [gb_cell(p, server), gb_cell(t, server), dash.to_string()]
    });
    let sum = |x: &Figures| x.cpu_per_gb.server + x.cpu_per_gb.client;
    row([
        "CPU s/GB 1-stream dl: Server+Client",
        dash,
        &format!("{:.2}", sum(p)),
        &format!("{:.2}", sum(t)),
        "< 3 s/GB",
        &both(sum(p) < 3.0, sum(t) < 3.0),
    ]);
    reference(
        &mut row,
        "CPU s/GB 1-stream dl: bench (Vis+backend)",
        [d, p, t].map(|x| x.cpu_per_gb.bench),
        2,
    );
    let peak = |x: &Figures, server: bool| {
        x.peak
            .map(|(s, c)| mib(if server { s.hwm_kib } else { c.hwm_kib }))
    };
    let peak_cell = |x: &Figures, server: bool| {
        peak(x, server).map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}"))
    };
    let peak_ok = |server: bool| {
        let pt = peak(p, server).is_some_and(|m| m < 32.0);
        let tm = peak(t, server).is_some_and(|m| m < 32.0);
        both(pt, tm)
    };
    per_role(&mut row, "peak RSS MiB during bulk", "< 32 MiB", |server| {
        [peak_cell(p, server), peak_cell(t, server), peak_ok(server)]
    });
    let idle_cell = |x: &Figures, server: bool| {
        let short = if x.idle_held < plan.idle {
            format!(" ({} held!)", x.idle_held)
        } else {
            String::new()
        };
        x.idle.map_or_else(
            || "n/a".to_string(),
            |(s, c)| {
                let kib = if server { s.rss_kib } else { c.rss_kib };
                format!("{:.1}{short}", mib(kib))
            },
        )
    };
    let idle = format!("RSS MiB, {} idle streams", plan.idle);
    per_role(&mut row, &idle, dash, |server| {
        [idle_cell(p, server), idle_cell(t, server), dash.to_string()]
    });
    let drops = d.udp_drops_bulk + p.udp_drops_bulk + t.udp_drops_bulk;
    row([
        "UDP RcvbufErrors during bulk (delta)",
        &d.udp_drops_bulk.to_string(),
        &p.udp_drops_bulk.to_string(),
        &t.udp_drops_bulk.to_string(),
        "0",
        verdict(drops == 0),
    ]);

    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    println!();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if n == 0 {
            println!("{}", "-".repeat(widths.iter().sum::<usize>() + 2 * 5));
        }
    }

    println!();
    println!("notes:");
    println!(
        "  MB = 10^6 bytes, GB = 10^9 payload bytes; single-stream = {} MiB, {}-stream = {} MiB each",
        plan.bulk / MIB,
        plan.streams,
        plan.bulk / MIB / plan.streams as u64
    );
    println!(
        "  bulk figures and CPU per GB: median of {} rounds, paths interleaved; peak RSS: highest round",
        plan.rounds
    );
    println!("  CPU ms/conn: Server and Client CPU in the rate phase per completed connection");
    println!(
        "  latency = fresh TCP + full TLS 1.3 handshake + 1 KiB reply, {} sequential; rate over {:?}",
        plan.latency_conns, plan.rate_for
    );
    println!(
        "  tunnel up {:.0} ms after start; RSS at start: Server {:.1} MiB, Client {:.1} MiB",
        o.up_after.as_secs_f64() * 1e3,
        mib(o.start_mem.0.rss_kib),
        mib(o.start_mem.1.rss_kib)
    );
    for (label, x) in [("passthrough", p), ("terminate", t)] {
        if let Some((s, c)) = x.idle_before {
            println!(
                "  {label}: RSS before opening idle streams: Server {:.1} MiB, Client {:.1} MiB; {} of {} opened, {} answered afterwards",
                mib(s.rss_kib),
                mib(c.rss_kib),
                x.idle_held,
                plan.idle,
                x.idle_ok,
            );
            if let Some(e) = &x.idle_first_err {
                println!(
                    "  {label}: WARNING only {} of {} idle streams opened; first error: {e}",
                    x.idle_held, plan.idle
                );
            }
        }
    }
    for (label, x) in [("direct", d), ("passthrough", p), ("terminate", t)] {
        if x.conn_failures > 0 {
            println!(
                "  {label}: {} failed requests in the connection-rate phase",
                x.conn_failures
            );
        }
    }
    if !o.peak_reset || p.peak.is_none() || t.peak.is_none() {
        println!("  peak RSS could not be reset per phase (clear_refs); values may be n/a");
    }
    let eof = EOF_WITHOUT_CLOSE_NOTIFY.load(Ordering::Relaxed);
    if eof > 0 {
        println!("  {eof} Visitor reads ended with TCP EOF but no TLS close_notify");
    }
    println!(
        "  UDP RcvbufErrors over the whole run: {} (counter is namespace-wide)",
        o.udp_drops_run
    );
}
