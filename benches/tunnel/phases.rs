//! Runs the phases in order (bulk, latency, rate, idle) and gathers their
//! figures; the phases themselves live in modules of their own.

use super::*;

#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) server: f64,
    pub(crate) client: f64,
    pub(crate) bench: f64,
}

pub(crate) struct Procs<'a> {
    pub(crate) server: &'a mut Proc,
    pub(crate) client: &'a mut Proc,
}

impl Procs<'_> {
    pub(crate) fn check(&mut self) -> Res<()> {
        self.server.check_alive()?;
        self.client.check_alive()
    }

    pub(crate) fn cpu(&mut self) -> Res<Cpu> {
        self.check()?;
        Ok(Cpu {
            server: self.server.cpu_secs()?,
            client: self.client.cpu_secs()?,
            bench: self_cpu_secs(),
        })
    }

    pub(crate) fn mem(&self) -> Res<(Mem, Mem)> {
        Ok((self.server.mem()?, self.client.mem()?))
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[n / 2],
    }
}

impl Figures {
    /// Medians of the bulk rounds.
    pub(crate) fn settle(&mut self) {
        let of = |f: fn(&BulkRound) -> f64| median(self.rounds.iter().map(f).collect());
        self.single_dl = of(|r| r.single_dl);
        self.single_ul = of(|r| r.single_ul);
        self.multi_dl = of(|r| r.multi_dl);
        self.cpu_per_gb = Cpu {
            server: of(|r| r.cpu_per_gb.server),
            client: of(|r| r.cpu_per_gb.client),
            bench: of(|r| r.cpu_per_gb.bench),
        };
    }
}

#[derive(Default)]
pub(crate) struct Figures {
    pub(crate) single_dl: f64,
    pub(crate) single_ul: f64,
    pub(crate) multi_dl: f64,
    /// Per-round bulk figures, reduced to the medians above by `settle`.
    pub(crate) rounds: Vec<BulkRound>,
    /// CPU seconds per GB (10^9 payload bytes) in the single-stream download.
    pub(crate) cpu_per_gb: Cpu,
    pub(crate) udp_drops_bulk: u64,
    pub(crate) peak: Option<(Mem, Mem)>,
    pub(crate) lat_p50: f64,
    pub(crate) lat_p99: f64,
    pub(crate) conn_rate: f64,
    pub(crate) conn_failures: u64,
    /// CPU milliseconds per connection in the connection-rate phase.
    pub(crate) cpu_per_conn: Cpu,
    pub(crate) idle: Option<(Mem, Mem)>,
    pub(crate) idle_before: Option<(Mem, Mem)>,
    pub(crate) idle_held: usize,
    pub(crate) idle_ok: usize,
    pub(crate) idle_first_err: Option<String>,
}

pub(crate) async fn within<T>(what: &str, f: impl Future<Output = io::Result<T>>) -> Res<T> {
    match tokio::time::timeout(PHASE_LIMIT, f).await {
        Ok(r) => r.ctx(what),
        Err(_) => Err(format!("{what}: no result within {PHASE_LIMIT:?}")),
    }
}

pub(crate) fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

pub(crate) async fn wait_up(v: &Visitor, procs: &mut Procs<'_>) -> Res<Duration> {
    let start = Instant::now();
    let mut last = String::from("no attempt");
    while start.elapsed() < UP_WITHIN {
        procs.check()?;
        match tokio::time::timeout(Duration::from_secs(2), v.request()).await {
            Ok(Ok(())) => return Ok(start.elapsed()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "request timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the tunnel for {:?} was not up within {UP_WITHIN:?}: {last}",
        v.name
    ))
}

/// What one measurement works with: the plan, the route under test, its
/// Visitor, the processes to check and the route's figures.
pub(crate) struct Run<'a, 'p>(
    pub(crate) &'a Plan,
    pub(crate) Route,
    pub(crate) &'a Visitor,
    pub(crate) &'a mut Procs<'p>,
    pub(crate) &'a mut Figures,
);

impl<'a, 'p> Run<'a, 'p> {
    /// The run for `route`, with that route's Visitor and figures.
    fn of(
        plan: &'a Plan,
        route: Route,
        visitors: &'a [Visitor; 3],
        procs: &'a mut Procs<'p>,
        figures: &'a mut [Figures; 3],
    ) -> Self {
        Run(
            plan,
            route,
            &visitors[route.index()],
            procs,
            &mut figures[route.index()],
        )
    }
}

pub(crate) struct Outcome {
    pub(crate) figures: [Figures; 3],
    pub(crate) start_mem: (Mem, Mem),
    pub(crate) up_after: Duration,
    pub(crate) udp_drops_run: u64,
    pub(crate) peak_reset: bool,
}

pub(crate) async fn measure(plan: &Plan, s: &mut Setup) -> Res<Outcome> {
    let tls_backend = listener(&s.tls_backend)?;
    let plain_backend = listener(&s.plain_backend)?;
    let tls_addr = tls_backend.local_addr().ctx("TLS backend address")?;
    tokio::spawn(backend(
        tls_backend,
        Some(TlsAcceptor::from(s.backend_tls.clone())),
    ));
    tokio::spawn(backend(plain_backend, None));

    let visitors = [
        Visitor::new(&s.visitor_tls, tls_addr, PASS_HOST)?,
        Visitor::new(&s.visitor_tls, s.public, PASS_HOST)?,
        Visitor::new(&s.visitor_tls, s.public, TERM_HOST)?,
    ];
    let mut procs = Procs {
        server: &mut s.server,
        client: &mut s.client,
    };
    let up_after = wait_up(&visitors[1], &mut procs).await?;
    wait_up(&visitors[2], &mut procs).await?;
    let start_mem = procs.mem()?;
    let drops_start = udp_rcvbuf_errors()?;
    let peak_reset = procs.server.reset_peak() && procs.client.reset_peak();

    eprintln!("warm-up");
    for v in &visitors {
        within("warm-up download", v.download(8 * MIB)).await?;
        for _ in 0..20 {
            within("warm-up request", v.request()).await?;
        }
    }

    let mut figures: [Figures; 3] = Default::default();
    eprintln!(
        "bulk transfers ({} MiB, {} rounds)",
        plan.bulk / MIB,
        plan.rounds
    );
    for _ in 0..plan.rounds {
        for r in ROUTES {
            bulk(Run::of(plan, r, &visitors, &mut procs, &mut figures)).await?;
        }
    }
    for f in &mut figures {
        f.settle();
    }
    eprintln!("new-connection latency ({} sequential)", plan.latency_conns);
    for r in ROUTES {
        latency(plan, r, &visitors[r.index()], &mut figures[r.index()]).await?;
    }
    eprintln!(
        "connection rate ({} concurrent, {:?})",
        plan.rate_workers, plan.rate_for
    );
    for r in ROUTES {
        procs.check()?;
        conn_rate(Run::of(plan, r, &visitors, &mut procs, &mut figures)).await?;
    }
    eprintln!("idle streams ({})", plan.idle);
    for r in [Route::Passthrough, Route::Terminate] {
        idle_streams(Run::of(plan, r, &visitors, &mut procs, &mut figures)).await?;
    }
    procs.check()?;
    let udp_drops_run = udp_rcvbuf_errors()?.saturating_sub(drops_start);
    Ok(Outcome {
        figures,
        start_mem,
        up_after,
        udp_drops_run,
        peak_reset,
    })
}

pub(crate) fn listener(l: &StdTcpListener) -> Res<TcpListener> {
    let l = l.try_clone().ctx("clone backend listener")?;
    l.set_nonblocking(true)
        .ctx("non-blocking backend listener")?;
    TcpListener::from_std(l).ctx("register backend listener")
}
