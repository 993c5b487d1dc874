//! The mesh control plane end to end, with real processes: a control server
//! (`runewarp control`), device agents (`runewarp node up`) and the admin
//! commands, all on loopback.

mod common;
use common::opt_in;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::proc::*;

fn control_toml(home: &Home, port: u16) -> std::path::PathBuf {
    home.write(
        "control.toml",
        &format!(
            "[control]\nlisten-address = \"127.0.0.1:{port}\"\nhostname = \"localhost\"\n\
             state-dir = \"control-state\"\n"
        ),
    )
}

/// `runewarp control -c control.toml ARGS`: (exit code, stdout, stderr).
fn admin(home: &Home, args: &[&str]) -> (i32, String, String) {
    admin_with(home, "control.toml", args)
}

/// [`admin`] with another config file (another replica's).
fn admin_with(home: &Home, config: &str, args: &[&str]) -> (i32, String, String) {
    let out = home
        .cmd()
        .args(["control", "-c", config])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup_key(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["setup-key", "create"];
    all.extend_from_slice(args);
    let (code, out, err) = admin(home, &all);
    assert_eq!(code, 0, "{err}");
    out.lines().last().unwrap().trim().to_string()
}

fn node_cmd(home: &Home, name: &str, port: u16, key: &str) -> Command {
    let mut c = home.cmd();
    common::mesh::node_up(&mut c, &format!("localhost:{port}"), name, key);
    c
}

fn node(home: &Home, name: &str, port: u16, key: &str) -> Running {
    let log = home.path().join(format!("{name}.log"));
    let child = node_cmd(home, name, port, key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Running { child, log }
}

fn organisation(home: &Home, name: &str) -> String {
    netmap(home, name).unwrap()["organisation"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_peers(home: &Home, name: &str, want: &[&str], within: Duration) -> Duration {
    wait_until(&format!("{name} sees {want:?}"), within, || {
        peers(home, name).is_some_and(|p| p == want)
    })
}

/// Let alice@acme.com reach acme's `db`-tagged devices on port 5432 (and
/// nothing else).
fn set_db_policy(home: &Home) {
    home.write(
        "policy.json",
        r#"{"acls": [{"action": "accept", "src": ["alice@acme.com"], "dst": ["tag:db:5432"]}]}"#,
    );
    let (code, _, err) = admin(home, &["policy", "set", "--org", "acme.com", "policy.json"]);
    assert_eq!(code, 0, "{err}");
}

/// The id of device `name` in `devices list` output.
fn device_id(list: &str, name: &str) -> String {
    common::mesh::listed_id(list, 2, name)
}

fn start_control(home: &Home) -> Running {
    let control = home.spawn("control", &home.path().join("control.toml"), "control.log");
    wait_until("control started", Duration::from_secs(15), || {
        !control.events("control_started").is_empty()
    });
    control
}

#[test]
fn devices_enrol_into_their_organisation_and_changes_reach_them_at_once() {
    let home = Home::new();
    let port = free_tcp();
    control_toml(&home, port);
    let mut control = start_control(&home);
    assert!(Path::new(&home.path().join("control-state/tls/server-ca.crt")).exists());

    let alice = setup_key(&home, &["--user", "alice@acme.com", "--reusable"]);
    let db = setup_key(&home, &["--org", "acme.com", "--tag", "db"]);
    let carol = setup_key(&home, &["--user", "carol@globex.com"]);
    let dave = setup_key(&home, &["--user", "dave@gmail.com"]);
    let erin = setup_key(&home, &["--user", "erin@gmail.com"]);
    let nodes = [
        ("a1", &alice),
        ("a2", &alice),
        ("db1", &db),
        ("g1", &carol),
        ("d1", &dave),
        ("e1", &erin),
    ];
    let mut running: Vec<(&str, Running)> = nodes
        .iter()
        .map(|(n, k)| (*n, node(&home, n, port, k)))
        .collect();
    let up = Duration::from_secs(20);
    // Default policy: a user's own devices, nothing across users or
    // organisations; consumer domains are personal organisations.
    wait_peers(&home, "a1", &["a2"], up);
    wait_peers(&home, "a2", &["a1"], up);
    for n in ["db1", "g1", "d1", "e1"] {
        wait_peers(&home, n, &[], up);
    }
    assert_eq!(organisation(&home, "a1"), "acme.com");
    assert_eq!(organisation(&home, "g1"), "globex.com");
    assert_eq!(organisation(&home, "d1"), "dave@gmail.com");
    assert_eq!(organisation(&home, "e1"), "erin@gmail.com");
    let text = std::fs::read_to_string(home.path().join("g1/netmap.json")).unwrap();
    assert!(
        !text.contains("acme"),
        "globex never learns of acme: {text}"
    );

    // Signal: a1 sends a2 a message sealed for a2; the server forwards
    // what it cannot read.
    const SECRET: &str = "candidate 192.0.2.7:51820 srflx";
    home.ok(&["node", "signal", "--state-dir", "a1", "--to", "a2", SECRET]);
    let inbox = home.path().join("a2/signals.jsonl");
    wait_until("a2 receives the signal", Duration::from_secs(5), || {
        std::fs::read_to_string(&inbox).is_ok_and(|t| t.contains(SECRET))
    });
    for f in [
        "control-state/control.db",
        "control-state/control.db-wal",
        "control.log",
    ] {
        let bytes = std::fs::read(home.path().join(f)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("192.0.2.7"),
            "{f} holds the plaintext"
        );
    }
    // Only to a peer in the sender's own map.
    let out = home
        .cmd()
        .args(["node", "signal", "--state-dir", "a1", "--to", "g1", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a peer"));

    // A single-use key enrols once.
    let out = node_cmd(&home, "db2", port, &db).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enrolment refused"), "{err}");

    // Setup keys are listed without their secrets, and a revoked one
    // enrols nothing more.
    let (code, list, err) = admin(&home, &["setup-key", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(list.contains("single-use\t1\tused"), "{list}");
    assert!(!list.contains("rwk_"), "{list}");
    let spare = setup_key(&home, &["--user", "alice@acme.com"]);
    let id = admin(&home, &["setup-key", "list"])
        .1
        .lines()
        .last()
        .and_then(|l| l.split('\t').next().map(str::to_string))
        .unwrap();
    let (code, out, err) = admin(&home, &["setup-key", "revoke", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked setup key"), "{out}");
    let out = node_cmd(&home, "spare", port, &spare).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let (code, _, err) = admin(&home, &["setup-key", "revoke", &id]);
    assert_eq!(code, 2, "a second revoke names the key: {err}");

    // A bad policy changes nothing and says where it is wrong.
    home.write(
        "bad.json",
        "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:ops\"], \"dst\": [\"*:*\"]}\n  ]\n}\n",
    );
    let (code, _, err) = admin(&home, &["policy", "set", "--org", "acme.com", "bad.json"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 3, column 34"), "{err}");

    // An ACL edit reaches the devices it concerns.
    set_db_policy(&home);
    let acl = wait_peers(&home, "db1", &["a1", "a2"], Duration::from_secs(5));
    wait_peers(&home, "a1", &["db1"], Duration::from_secs(5));
    let filter = std::fs::read_to_string(home.path().join("db1/netmap.json")).unwrap();
    assert!(filter.contains("\"ports\": \"5432\""), "{filter}");
    assert_eq!(peers(&home, "g1").unwrap(), Vec::<String>::new());

    // Revocation: the peers drop it, the revoked agent stops and says why.
    let (_, list, _) = admin(&home, &["devices", "list"]);
    let a2_id = device_id(&list, "a2");
    let (code, _, err) = admin(&home, &["devices", "revoke", &a2_id]);
    assert_eq!(code, 0, "{err}");
    let revoke = wait_peers(&home, "db1", &["a1"], Duration::from_secs(5));
    let a2 = &mut running.iter_mut().find(|(n, _)| *n == "a2").unwrap().1;
    let (status, _) = a2.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
    assert_eq!(a2.events("node_revoked").len(), 1, "{}", a2.log_text());
    eprintln!(
        "ACL edit reached db1 in {} ms, revocation in {} ms",
        acl.as_millis(),
        revoke.as_millis()
    );

    // A control restart: agents reconnect and keep their maps.
    control.stop_with(libc::SIGTERM, Duration::from_secs(5));
    let mut control = start_control(&home);
    let a1 = &running.iter().find(|(n, _)| *n == "a1").unwrap().1;
    wait_until("a1 reconnects", Duration::from_secs(10), || {
        a1.events("node_connected").len() >= 2
    });
    assert_eq!(peers(&home, "a1").unwrap(), ["db1"]);

    let (_, status, _) = {
        let out = home
            .cmd()
            .args(["node", "status", "--state-dir", "a1"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            (),
        )
    };
    assert!(status.contains("organisation: acme.com"), "{status}");
    assert!(status.contains("db1"), "{status}");
    for (_, mut r) in running {
        if r.child.try_wait().unwrap().is_none() {
            r.stop_with(libc::SIGTERM, Duration::from_secs(5));
        }
    }
    control.stop_with(libc::SIGTERM, Duration::from_secs(5));
}

#[test]
fn a_control_config_error_names_the_key() {
    let home = Home::new();
    home.write("control.toml", "[control]\nhostname = \"localhost\"\n");
    let (code, _, err) = admin(&home, &["devices"]);
    assert_eq!(code, 2);
    assert!(err.contains("control.state-dir is required"), "{err}");
}

#[test]
fn config_check_knows_the_control_role() {
    let home = Home::new();
    home.write("bad.toml", "[control]\nhostname = \"localhost\"\n");
    let err = stderr_of(
        home.cmd()
            .args(["config", "check", "--role", "control", "-c", "bad.toml"]),
        2,
    );
    assert!(err.contains("control.state-dir is required"), "{err}");
    control_toml(&home, 7443);
    let out = home.ok(&["config", "check", "--role", "control", "-c", "control.toml"]);
    assert!(out.contains("listen-address = \"127.0.0.1:7443\""), "{out}");

    // A database URL file that exists only where the service runs (a
    // credential) passes the check unread, as at a NixOS build; starting
    // the server with it is an error naming the key.
    home.write(
        "pg.toml",
        "[control]\nhostname = \"localhost\"\nstate-dir = \"s\"\n\
         database-url-file = \"/run/credentials/none/db-url\"\n",
    );
    home.ok(&["config", "check", "--role", "control", "-c", "pg.toml"]);
    let err = stderr_of(home.cmd().args(["control", "-c", "pg.toml"]), 2);
    assert!(err.contains("control.database-url-file"), "{err}");
}

/// The NixOS module hands the setup key in as a credential file.
#[test]
fn a_node_enrols_with_a_setup_key_file_and_a_missing_one_is_named() {
    let home = Home::new();
    let missing = stderr_of(
        home.cmd().args([
            "node",
            "up",
            "--control",
            "https://localhost:1",
            "--setup-key-file",
            "no-such-key",
            "--state-dir",
            "n",
        ]),
        2,
    );
    assert!(missing.contains("no-such-key"), "{missing}");

    let port = free_tcp();
    control_toml(&home, port);
    let mut control = start_control(&home);
    let key = setup_key(&home, &["--user", "alice@acme.com"]);
    home.write("setup-key", &format!("{key}\n"));
    let log = home.path().join("laptop.log");
    let child = home
        .cmd()
        .args(["node", "up", "--control"])
        .arg(format!("https://localhost:{port}"))
        .args(["--setup-key-file", "setup-key"])
        .args(["--ca-file", "control-state/tls/server-ca.crt"])
        .args(["--hostname", "laptop", "--state-dir", "laptop"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut laptop = Running { child, log };
    wait_until("laptop enrolled", Duration::from_secs(15), || {
        peers(&home, "laptop").is_some()
    });
    assert_eq!(organisation(&home, "laptop"), "acme.com");

    // The API speaks HTTP/2 (ALPN h2) and still HTTP/1.1 (asked with
    // curl, an external program: not in the Nix build sandbox).
    let curl = opt_in::enabled(opt_in::EXTERNAL, "control_api_http_versions", "curl");
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")]
        .into_iter()
        .filter(|_| curl)
    {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_version}", flag])
            .arg("--cacert")
            .arg(home.path().join("control-state/tls/server-ca.crt"))
            .arg(format!("https://localhost:{port}/v1/map"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{flag}");
    }
    // `node down` stops it (key and enrolment stay); a second `down` finds
    // nothing running.
    let out = home.ok(&["node", "down", "--state-dir", "laptop"]);
    assert!(out.contains("node stopped"), "{out}");
    let status = laptop.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!home.path().join("laptop/node.pid").exists());
    assert!(home.path().join("laptop/enrolment.json").exists());
    let out = home.ok(&["node", "down", "--state-dir", "laptop"]);
    assert!(out.contains("no node is running"), "{out}");
    control.stop_with(libc::SIGTERM, Duration::from_secs(5));
}

/// Two control replicas on one PostgreSQL database, as behind a load
/// balancer: devices on either see changes made through the other (or by
/// the admin CLI) within 2 s, through LISTEN/NOTIFY rather than the slow
/// poll.
#[test]
fn two_replicas_on_postgres_carry_changes_to_each_others_devices() {
    if !opt_in::enabled(
        opt_in::EXTERNAL,
        "two_replicas_on_postgres",
        "PostgreSQL server binaries (Debian's postgresql)",
    ) {
        return;
    }
    let pg = common::postgres::Postgres::start();
    let url = pg.create_db("runewarp");
    let home = Home::new();
    let (p1, p2) = (free_tcp(), free_tcp());
    // Replica 1 names the database inline; replica 2 reads it from a file,
    // password included (trust authentication ignores it), which must
    // never reach a log.
    home.write(
        "control.toml",
        &format!(
            "[control]\nlisten-address = \"127.0.0.1:{p1}\"\nhostname = \"localhost\"\n\
             state-dir = \"control-state\"\ndatabase-url = \"{url}\"\n"
        ),
    );
    home.write("db-url", &format!("{url} password=hunter2\n"));
    home.write(
        "control2.toml",
        &format!(
            "[control]\nlisten-address = \"127.0.0.1:{p2}\"\nhostname = \"localhost\"\n\
             state-dir = \"control-state-2\"\ndatabase-url-file = \"db-url\"\n"
        ),
    );
    let mut c1 = start_control(&home);
    // Both replicas present the same certificate, so devices trust either.
    std::fs::create_dir_all(home.path().join("control-state-2")).unwrap();
    stderr_of(
        Command::new("cp")
            .arg("-a")
            .arg(home.path().join("control-state/tls"))
            .arg(home.path().join("control-state-2/tls")),
        0,
    );
    let mut c2 = home.spawn(
        "control",
        &home.path().join("control2.toml"),
        "control2.log",
    );
    wait_until("replica 2 started", Duration::from_secs(15), || {
        !c2.events("control_started").is_empty()
    });
    // Both replicas must be listening before the first registration, or
    // its notification can reach a replica whose listener is not up yet.
    for (name, c) in [("replica 1 listens", &c1), ("replica 2 listens", &c2)] {
        wait_until(name, Duration::from_secs(5), || {
            !c.events("database_listening").is_empty()
        });
    }
    let db_line = c2.events("control_database");
    assert!(
        db_line.iter().any(|l| l.contains("postgres")),
        "{db_line:?}"
    );

    let alice = setup_key(&home, &["--user", "alice@acme.com", "--reusable"]);
    let db = setup_key(&home, &["--org", "acme.com", "--tag", "db"]);
    let mut running = vec![node(&home, "a1", p1, &alice), node(&home, "a2", p2, &alice)];
    let up = Duration::from_secs(20);
    wait_peers(&home, "a1", &["a2"], up);
    wait_peers(&home, "a2", &["a1"], up);

    // A registration on replica 1 reaches a device on replica 2.
    running.push(node(&home, "a3", p1, &alice));
    let enrol = wait_peers(&home, "a2", &["a1", "a3"], up);
    // An ACL edit by the admin CLI reaches a device on replica 2.
    running.push(node(&home, "db1", p2, &db));
    wait_peers(&home, "db1", &[], up);
    set_db_policy(&home);
    let acl = wait_peers(&home, "db1", &["a1", "a2", "a3"], Duration::from_secs(2));
    // A revocation through replica 2's config reaches replica 1's devices.
    let (_, list, _) = admin_with(&home, "control2.toml", &["devices", "list"]);
    let (code, _, err) = admin_with(
        &home,
        "control2.toml",
        &["devices", "revoke", &device_id(&list, "a3")],
    );
    assert_eq!(code, 0, "{err}");
    let revoke = wait_peers(&home, "db1", &["a1", "a2"], Duration::from_secs(2));
    // a3 streams from replica 1, which learns of it from the database.
    let (status, _) = running[2].wait_exit(Duration::from_secs(2));
    assert_eq!(status.code(), Some(1));
    assert_eq!(running[2].events("node_revoked").len(), 1);

    // Devices enrolled at once through both replicas get distinct
    // addresses.
    for i in 0..6 {
        let name = format!("b{i}");
        running.push(node(&home, &name, if i % 2 == 0 { p1 } else { p2 }, &alice));
    }
    for i in 0..6 {
        let map = home.path().join(format!("b{i}/netmap.json"));
        wait_until(&format!("b{i} enrolled"), up, || map.exists());
    }
    let (code, list, err) = admin(&home, &["devices", "list"]);
    assert_eq!(code, 0, "{err}");
    let addrs: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(3))
        .collect();
    let unique: std::collections::HashSet<&&str> = addrs.iter().collect();
    assert_eq!((addrs.len(), unique.len()), (10, 10), "{list}");
    eprintln!(
        "replica-to-replica: enrolment {} ms, ACL edit {} ms, revocation {} ms",
        enrol.as_millis(),
        acl.as_millis(),
        revoke.as_millis()
    );

    for r in &mut running {
        if r.child.try_wait().unwrap().is_none() {
            r.stop_with(libc::SIGTERM, Duration::from_secs(5));
        }
    }
    // A stop is clean: closing the database connections panics nowhere.
    for (log, c) in [("control.log", &mut c1), ("control2.log", &mut c2)] {
        let (status, _) = c.stop_with(libc::SIGTERM, Duration::from_secs(5));
        let text = std::fs::read_to_string(home.path().join(log)).unwrap();
        assert!(
            status.success() && !text.contains("panicked"),
            "{status}: {text}"
        );
        assert!(!text.contains("hunter2"), "{log} holds the password");
    }
}
