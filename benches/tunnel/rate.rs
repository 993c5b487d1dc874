//! Connection rate: 64 concurrent workers opening connections for a fixed time.

use super::*;

pub(crate) async fn conn_rate(Run(plan, route, v, procs, f): Run<'_, '_>) -> Res<()> {
    let before = procs.cpu()?;
    let start = Instant::now();
    let deadline = start + plan.rate_for;
    let mut set = JoinSet::new();
    for _ in 0..plan.rate_workers {
        let v = v.clone();
        set.spawn(async move {
            let (mut ok, mut bad) = (0u64, 0u64);
            let mut first_err = None;
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(5), v.request()).await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(e)) => {
                        bad += 1;
                        first_err.get_or_insert(e.to_string());
                    }
                    Err(_) => {
                        bad += 1;
                        first_err.get_or_insert("timed out after 5 s".into());
                    }
                }
            }
            (ok, bad, first_err)
        });
    }
    let (mut ok, mut bad, mut first_err) = (0u64, 0u64, None);
    while let Some(r) = set.join_next().await {
        let (o, b, e) = r.ctx("connection-rate worker")?;
        ok += o;
        bad += b;
        if first_err.is_none() {
            first_err = e;
        }
    }
    let took = start.elapsed();
    if ok == 0 {
        return Err(format!(
            "{} connection rate: every request failed: {}",
            route.label(),
            first_err.unwrap_or_default()
        ));
    }
    f.conn_rate = ok as f64 / took.as_secs_f64();
    f.conn_failures = bad;
    let after = procs.cpu()?;
    let per_conn = |a: f64, b: f64| (a - b) * 1e3 / ok as f64;
    f.cpu_per_conn = Cpu {
        server: per_conn(after.server, before.server),
        client: per_conn(after.client, before.client),
        bench: per_conn(after.bench, before.bench),
    };
    eprintln!(
        "  {}: {:.0} new connections/s ({} failed{})",
        route.label(),
        f.conn_rate,
        bad,
        first_err
            .map(|e| format!(", first: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}
