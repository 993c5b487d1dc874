//! New-connection latency: one full TLS handshake and a 1 KiB reply at a time.

use super::*;

pub(crate) fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

pub(crate) async fn latency(plan: &Plan, route: Route, v: &Visitor, f: &mut Figures) -> Res<()> {
    let mut ms = Vec::with_capacity(plan.latency_conns);
    let run = async {
        for _ in 0..plan.latency_conns {
            let t = Instant::now();
            v.request().await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    within(&format!("{} latency", route.label()), run).await?;
    ms.sort_by(f64::total_cmp);
    f.lat_p50 = percentile(&ms, 50.0);
    f.lat_p99 = percentile(&ms, 99.0);
    eprintln!(
        "  {}: new-connection latency p50 {:.3} ms, p99 {:.3} ms",
        route.label(),
        f.lat_p50,
        f.lat_p99
    );
    Ok(())
}
