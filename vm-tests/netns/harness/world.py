"""The deployment the scenarios run on: the test PKI, the backend, Pebble,
Runewarp Server and Client processes from vm-tests/configs, and the Rig
(vm-tests/scenarios/rig.py) that the shared scenarios use."""

import hashlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from contextlib import contextmanager

from scenarios.rig import Rig

from .net import ADDR, CONFIGS, IDENTITY, REPO, Failure, log, run

SCENARIOS = os.path.join(REPO, "vm-tests", "scenarios")

# --- test material (as vm-tests/pki.nix) ----------------------------------

def make_pki(d):
    os.makedirs(d, exist_ok=True)
    def sh(cmd):
        run(["sh", "-ec", cmd], cwd=d)
    sh('openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes '
       '-days 3650 -subj "/CN=Runewarp VM test CA" -keyout ca.key -out ca.crt '
       '-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null')
    for name in ("app.example.com", "acme.test"):
        sh(f'openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes '
           f'-subj "/CN={name}" -keyout {name}.key -out {name}.csr 2>/dev/null\n'
           f'printf "%s\\n" "subjectAltName=DNS:{name}" "basicConstraints=critical,CA:FALSE" '
           f'"keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > {name}.ext\n'
           f'openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial '
           f'-days 3650 -extfile {name}.ext -out {name}.crt 2>/dev/null\n'
           f'rm {name}.csr {name}.ext')


# --- the backend node (as vm-tests/common.nix's nginx) ---------------------

BACKEND_PY = r'''
import http.server, socketserver, ssl, sys, threading, hashlib
PKI = sys.argv[1]
BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(32768))  # 1 MiB
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        body = self.server.body
        if self.path.startswith("/big") or self.path.startswith("/bytes/"):
            n = 128 << 20 if self.path == "/big" else int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            off = 0
            try:
                while off < n:
                    chunk = BLOCK[: min(len(BLOCK), n - off)]
                    self.wfile.write(chunk)
                    off += len(chunk)
            except OSError:
                pass
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
def serve(port, body, tls, cc=None):
    s = S(("0.0.0.0", port), H)
    s.body = body
    if cc:  # accepted connections inherit the listener's congestion control
        import socket
        s.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{PKI}/app.example.com.crt", f"{PKI}/app.example.com.key")
        s.socket = ctx.wrap_socket(s.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=s.serve_forever, daemon=True).start()
serve(8443, "backend-1", True)
serve(8444, "backend-2", True)
serve(8080, "plain-http-backend", False)
serve(9443, "backend-1", True, cc="cubic")  # benchmark: direct TCP with Cubic
print("backend ready", flush=True)
threading.Event().wait()
'''

BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(32768))


def check_prefix(path):
    """Every byte received is the backend's byte at that offset (nothing
    acknowledged is lost or corrupted); returns the size."""
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(len(BLOCK))
            if not chunk:
                return size
            if chunk != BLOCK[: len(chunk)]:
                raise Failure(f"{path}: received bytes differ from the backend's at offset ~{size}")
            size += len(chunk)


# --- the deployment: configs from vm-tests/configs ------------------------

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_dump(d, prefix=""):
    out, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            tables.append((k, v))
        else:
            out.append(f"{k} = {toml_value(v)}")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.append(f"\n[{name}]")
            out.append(toml_dump(v, name + "."))
        else:
            for item in v:
                out.append(f"\n[[{name}]]")
                out.append(toml_dump(item, name + "."))
    return "\n".join(out)


def merge(a, b):
    """lib.recursiveUpdate"""
    r = dict(a)
    for k, v in b.items():
        r[k] = merge(r[k], v) if isinstance(v, dict) and isinstance(r.get(k), dict) else v
    return r


def read_config(name):
    with open(os.path.join(CONFIGS, name), "rb") as f:
        return tomllib.load(f)


class World:
    """The hosts plus what runs on them; each scenario gets fresh state."""

    def __init__(self, net, runewarp, work):
        self.net, self.bin, self.work = net, runewarp, work
        for name, h in net.hosts.items():
            setattr(self, name, h)
        self.pki = os.path.join(work, "pki")
        make_pki(self.pki)
        self.backend_proc = self.backend.spawn("backend", ["python3", "-c", BACKEND_PY, self.pki])
        self.backend_proc.wait_for_log("backend ready", timeout=10)
        self.pebble = None
        self.challtestsrv = None
        self.seq = 0

    def fresh_dir(self, what):
        self.seq += 1
        d = os.path.join(self.work, f"{self.seq:02d}-{what}")
        os.makedirs(d)
        return d

    # Pebble on the acme host, challtestsrv as its DNS (every name -> server).
    def start_acme(self):
        if self.challtestsrv is None:
            self.challtestsrv = self.acme.spawn("challtestsrv", [
                "pebble-challtestsrv", "-dns01", ":8053", "-management", ":8055",
                "-http01", "", "-https01", "", "-tlsalpn01", "",
                "-defaultIPv4", ADDR["server"], "-defaultIPv6", ""])
            time.sleep(0.3)
            if not self.challtestsrv.running():
                raise Failure(f"pebble-challtestsrv exited:\n{self.challtestsrv.text()}")
        with open(os.path.join(REPO, "pebble", "pebble-config.json")) as f:
            cfg = json.load(f)
        cfg["pebble"]["certificate"] = f"{self.pki}/acme.test.crt"
        cfg["pebble"]["privateKey"] = f"{self.pki}/acme.test.key"
        path = os.path.join(self.work, "pebble-config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.pebble = self.acme.spawn("pebble", [
            "pebble", "-config", path, "-dnsserver", "127.0.0.1:8053", "-strict", "false"],
            env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        self.pebble.wait_for_log("ACME directory available", timeout=20)

    def pebble_root(self, host):
        pem = host.wait_until_succeeds(curl(self, "https://acme.test:15000/roots/0"))
        path = os.path.join(self.work, f"pebble-root-{self.seq}.pem")
        with open(path, "w") as f:
            f.write(pem)
        return path

    def runewarp(self, host, name, role, config, d, env=None, prepare=False):
        path = os.path.join(d, f"{name}.toml")
        with open(path, "w") as f:
            f.write(toml_dump(config) + "\n")
        if prepare and role == "server" and "acme" not in config["server"]:
            # What the NixOS module's ExecStartPre does on first start.
            run([self.bin, "server", "cert", "init", "-c", path], env={"HOME": d, "PATH": os.environ["PATH"]})
        e = {"HOME": d}
        # RUNEWARP_NETNS_LOG: a RUNEWARP_LOG directive for every process.
        if os.environ.get("RUNEWARP_NETNS_LOG"):
            e["RUNEWARP_LOG"] = os.environ["RUNEWARP_NETNS_LOG"]
        e.update(env or {})
        return host.spawn(name, [self.bin, role, "-c", path], env=e)

    def start_server(self, config="server.toml", override=None):
        d = self.fresh_dir("server")
        cfg = merge(read_config(config), override or {})
        s = cfg["server"]
        if "acme" in s:
            s["acme"]["state-dir"] = os.path.join(d, "acme")
            s["acme"]["directory-ca-file"] = f"{self.pki}/ca.crt"
        else:
            s.setdefault("cert-dir", os.path.join(d, "certs"))
        srv = self.runewarp(self.server, "server", "server", cfg, d, prepare=True)
        srv.dir = srv.state = d
        srv.cert_dir = s.get("cert-dir")
        srv.wait_for_log("server_started", timeout=20)
        return srv

    def restart_server(self, old):
        """The stopped Server `old` again (server.toml), with its material."""
        new = self.runewarp(self.server, "server", "server",
                            merge(read_config("server.toml"), {"server": {"cert-dir": old.cert_dir}}),
                            old.dir)
        new.dir, new.state, new.cert_dir = old.dir, old.state, old.cert_dir
        return new

    def start_client(self, host, server, config="client-passthrough.toml", override=None,
                     ca=None, identity=True):
        """A Client instance from vm-tests/configs; `ca` is the trust root
        (default: the Server's private CA, as install_server_ca)."""
        d = self.fresh_dir(f"{host.name}")
        cfg = merge(read_config(config), override or {})
        c = cfg["client"]
        ca_path = os.path.join(d, "server-ca.crt")
        shutil.copy(ca or os.path.join(server.cert_dir, "server-ca.crt"), ca_path)
        c["server-ca-file"] = ca_path
        if identity:
            ident = os.path.join(d, "identity")
            shutil.copytree(IDENTITY, ident)
            os.chmod(ident, 0o700)
            for fn in os.listdir(ident):
                os.chmod(os.path.join(ident, fn), 0o600)
            c["identity-dir"] = ident
        else:
            # What the NixOS module's ExecStartPre does for a fresh instance.
            c["identity-dir"] = os.path.join(d, "identity")
            run([self.bin, "client", "identity", "init", "--dir", c["identity-dir"]])
        env = {"HOME": d}
        pin = run([self.bin, "client", "identity", "show", "--dir", c["identity-dir"]],
                  env=env | {"PATH": os.environ["PATH"]}).stdout.strip()
        if "acme" in c:
            c["acme"]["state-dir"] = os.path.join(d, "acme")
            c["acme"]["directory-ca-file"] = f"{self.pki}/ca.crt"
        else:
            # What the NixOS module's ExecStartPre does for terminate
            # Services without ACME: a Public hostname CA and leaves.
            names = [n for svc in c.get("services", []) if svc.get("tls-mode") == "terminate"
                     for n in svc.get("public-hostnames", [])]
            if names:
                c["public-cert-dir"] = os.path.join(d, "public-certs")
                run([self.bin, "client", "public-cert", "init", "--dir", c["public-cert-dir"]]
                    + [a for n in names for a in ("--hostname", n)])
        c["control-socket"] = os.path.join(d, "client.sock")
        cl = self.runewarp(host, "client", "client", cfg, d)
        cl.dir = cl.state = d
        cl.socket = c["control-socket"]
        cl.pin = pin
        return cl


def curl(w, args=""):
    return f"curl -sS --fail --max-time 10 --cacert {w.pki}/ca.crt {args}"


@contextmanager
def subtest(name):
    start = time.monotonic()
    log(f"  subtest: {name}")
    yield
    log(f"  ok ({time.monotonic() - start:.1f}s): {name}")


# Visitor download rate for the fault scenarios: slow enough that the
# 128 MiB transfer outlives any fault (128 s), fast enough that what the
# path had already buffered when the tunnel was cut (socket buffers, up to
# several MiB) drains well inside the 30 s bound. At 256 KiB/s a full
# receive buffer alone took longer than that.
DOWNLOAD_RATE = "1m"


def start_download(w, name, path="/big", rate=DOWNLOAD_RATE, url=None):
    """A Visitor download in the background (curl in the visitor host)."""
    out = os.path.join(w.work, f"{name}.out")
    if os.path.exists(out):
        os.remove(out)
    url = url or f"https://app.example.com{path}"
    limit = ["--limit-rate", rate] if rate else []
    p = w.visitor.spawn(name, ["curl", "-sS", "--fail", "--cacert", f"{w.pki}/ca.crt"] + limit
                        + ["-o", out, url])
    p.out = out
    deadline = time.monotonic() + 20
    while not (os.path.exists(out) and os.path.getsize(out) > 262144):
        if time.monotonic() > deadline or not p.running():
            raise Failure(f"download {name} did not start: {p.text()}")
        time.sleep(0.1)
    return p


def download_cut(p, within=30):
    try:
        code = p.p.wait(timeout=within)
    except subprocess.TimeoutExpired:
        raise Failure(f"{p.name}: the transfer was not cut within {within}s")
    size = check_prefix(p.out)
    if code == 0 and size >= 128 << 20:
        raise Failure(f"{p.name}: the transfer was drained, not cut")
    return code, size


class NetnsRig(Rig):
    """The namespace driver's Rig (vm-tests/scenarios/rig.py): Runewarp
    processes started from vm-tests/configs with the scenario's overrides;
    the scenario's processes are stopped by the caller afterwards."""

    def __init__(self, w):
        self.w = w
        self.server, self.client, self.client2 = w.server, w.client, w.client2
        self.backend, self.visitor, self.acme = w.backend, w.visitor, w.acme
        self.cacert = f"{w.pki}/ca.crt"
        self.running_server = None
        # The gate scenario's files (vm-tests/scenarios/gate.py).
        self.gate_config = os.path.join(w.work, "gate", "gate.toml")
        self.gate_state_dir = os.path.join(w.work, "gate", "state")
        self.smtp_password = os.path.join(w.work, "gate", "smtp-password")

    def subtest(self, name):
        return subtest(name)

    def log(self, msg):
        log(msg)

    def start_server(self, config="server.toml"):
        self.running_server = self.w.start_server(config=config)
        return self.running_server

    def restart_server(self, old):
        self.running_server = self.w.restart_server(old)
        return self.running_server

    def start_client(self, host, config="client-passthrough.toml", override=None, ca=None):
        return self.w.start_client(host, self.running_server, config=config, override=override, ca=ca)

    def start_fresh_client(self):
        """An instance on client2 that creates its identity on first start."""
        return self.w.start_client(self.client2, self.running_server, identity=False,
                                   override={"client": {"services": [{"backend-address": "backend:8443"}]}})

    def pebble_root_file(self, host):
        return self.w.pebble_root(host)

    def start_smtp_sink(self, host):
        """vm-tests/scenarios/smtp_sink.py in `host`, and the password file
        the gate roles read (as gate.nix's /etc/runewarp-test/smtp-password)."""
        os.makedirs(os.path.dirname(self.smtp_password), exist_ok=True)
        with open(self.smtp_password, "w") as f:
            f.write("sink-secret\n")
        mails = os.path.join(self.w.fresh_dir("smtp-sink"), "mail")
        sink = host.spawn("smtp-sink", ["python3", os.path.join(SCENARIOS, "smtp_sink.py"), mails])
        sink.wait_for_log("smtp sink ready", timeout=10)
        return mails

    def smtp_password_file(self, role):
        return self.smtp_password

    def start_gate(self, host):
        """`runewarp gate -c gate_config` in `host`; reload() sends SIGHUP."""
        env = {"HOME": os.path.dirname(self.gate_config)}
        if os.environ.get("RUNEWARP_NETNS_LOG"):
            env["RUNEWARP_LOG"] = os.environ["RUNEWARP_NETNS_LOG"]
        gate = host.spawn("gate", [self.w.bin, "gate", "-c", self.gate_config], env=env)
        gate.state = self.gate_state_dir
        gate.wait_for_log("gate_listening", timeout=20)
        return gate

    def start_download(self, name):
        return start_download(self.w, name)

    def download_cut(self, d):
        code, size = download_cut(d)
        return f"Visitor got {size} correct bytes, curl exit {code}"
