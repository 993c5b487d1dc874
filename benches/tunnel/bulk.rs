//! Bulk transfer: single-stream download and upload, and the 8-stream aggregate, in interleaved rounds.

use super::*;

#[derive(Clone, Copy)]
pub(crate) struct BulkRound {
    pub(crate) single_dl: f64,
    pub(crate) single_ul: f64,
    pub(crate) multi_dl: f64,
    pub(crate) cpu_per_gb: Cpu,
}

pub(crate) async fn bulk(Run(plan, route, v, procs, f): Run<'_, '_>) -> Res<()> {
    let label = route.label();
    let tunnel = route != Route::Direct;
    let peak_reset = tunnel && procs.server.reset_peak() && procs.client.reset_peak();
    let drops_start = udp_rcvbuf_errors()?;

    let before = procs.cpu()?;
    let t = Instant::now();
    within(
        &format!("{label} single-stream download"),
        v.download(plan.bulk),
    )
    .await?;
    let took = t.elapsed();
    let after = procs.cpu()?;
    let gb = plan.bulk as f64 / 1e9;
    let mut round = BulkRound {
        single_dl: mb_per_s(plan.bulk, took),
        single_ul: 0.0,
        multi_dl: 0.0,
        cpu_per_gb: Cpu {
            server: (after.server - before.server) / gb,
            client: (after.client - before.client) / gb,
            bench: (after.bench - before.bench) / gb,
        },
    };
    eprintln!(
        "  {label}: single-stream download {:.1} MB/s",
        round.single_dl
    );

    let t = Instant::now();
    within(
        &format!("{label} single-stream upload"),
        v.upload(plan.bulk),
    )
    .await?;
    round.single_ul = mb_per_s(plan.bulk, t.elapsed());
    eprintln!(
        "  {label}: single-stream upload {:.1} MB/s",
        round.single_ul
    );

    let each = plan.bulk / plan.streams as u64;
    let t = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..plan.streams {
        let v = v.clone();
        set.spawn(async move { v.download(each).await });
    }
    let all = async {
        while let Some(r) = set.join_next().await {
            r.map_err(io::Error::other)??;
        }
        Ok(())
    };
    within(&format!("{label} {}-stream download", plan.streams), all).await?;
    round.multi_dl = mb_per_s(each * plan.streams as u64, t.elapsed());
    eprintln!(
        "  {label}: {}-stream download {:.1} MB/s",
        plan.streams, round.multi_dl
    );
    f.rounds.push(round);

    procs.check()?;
    f.udp_drops_bulk += udp_rcvbuf_errors()?.saturating_sub(drops_start);
    if tunnel && peak_reset {
        let (server, client) = procs.mem()?;
        let (max_server, max_client) = f.peak.unwrap_or_default();
        let higher = |a: Mem, b: Mem| if a.hwm_kib >= b.hwm_kib { a } else { b };
        f.peak = Some((higher(server, max_server), higher(client, max_client)));
    }
    Ok(())
}
