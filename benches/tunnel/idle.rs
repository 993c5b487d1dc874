//! Idle streams: memory of the Server and Client with many open, quiet streams.

use super::*;

pub(crate) async fn idle_streams(Run(plan, route, v, procs, f): Run<'_, '_>) -> Res<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.idle_before = Some(procs.mem()?);
    let mut held = Vec::with_capacity(plan.idle);
    let mut set = JoinSet::new();
    let mut started = 0;
    let mut failed = 0usize;
    let mut first_err = None;
    // A refused stream is a finding, not a broken bench: keep what opened,
    // record why the rest did not.
    let open = async {
        while started < plan.idle || !set.is_empty() {
            while started < plan.idle && set.len() < 32 {
                let v = v.clone();
                // 100 streams per source address, under the per-source cap.
                let source = u8::try_from(started / 100).unwrap_or(u8::MAX - 2);
                set.spawn(async move {
                    tokio::time::timeout(Duration::from_secs(10), v.connect_from(source)).await
                });
                started += 1;
            }
            let err = match set.join_next().await {
                Some(Ok(Ok(Ok(s)))) => {
                    held.push(s);
                    continue;
                }
                Some(Ok(Ok(Err(e)))) => e.to_string(),
                Some(Ok(Err(_))) => "connect + handshake timed out after 10 s".into(),
                Some(Err(e)) => e.to_string(),
                None => break,
            };
            failed += 1;
            first_err.get_or_insert(err);
        }
        Ok(())
    };
    within(&format!("{} opening idle streams", route.label()), open).await?;
    if held.is_empty() {
        return Err(format!(
            "{}: no idle stream could be opened: {}",
            route.label(),
            first_err.unwrap_or_default()
        ));
    }
    f.idle_held = held.len();
    f.idle_first_err = first_err;
    tokio::time::sleep(Duration::from_millis(500)).await;
    procs.check()?;
    f.idle = Some(procs.mem()?);
    // Each held stream must still answer: proof they are really open
    // end to end, not just accepted by the Server.
    let check = async {
        let mut ok = 0usize;
        for s in held.iter_mut() {
            if ask(s).await.is_ok() {
                ok += 1;
            }
            close(s).await?;
        }
        Ok(ok)
    };
    f.idle_ok = within(&format!("{} idle stream check", route.label()), check).await?;
    drop(held);
    eprintln!(
        "  {}: {} of {} idle streams opened ({failed} failed), {} answered afterwards",
        route.label(),
        f.idle_held,
        plan.idle,
        f.idle_ok
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
