# The NixOS VM test driver's Rig (see rig.py): Runewarp as the systemd units
# of the NixOS modules on the test's nodes (vm-tests/common.nix). The role
# configs and overrides are the nodes' (declared in Nix), so start_server's
# `config` and start_client's `config` and `override` only matter to the
# namespace driver. vm-tests/common.nix splices rig.py, this file and the
# scenario into each VM test's testScript (write_file comes from rig.py).
import time

SERVER_CA = "/var/lib/runewarp-server/certs/server-ca.crt"


class Unit:
    """A Runewarp role unit on a node."""

    def __init__(self, host, unit):
        self.host, self.unit = host, unit
        self.state = f"/var/lib/{unit}"
        self.pin = None

    def log_text(self):
        return self.host.succeed(f"journalctl -o cat -u {self.unit}")

    def wait_for_log(self, needle, timeout=120):
        self.host.wait_until_succeeds(f"journalctl -o cat -u {self.unit} | grep -q '{needle}'", timeout=timeout)

    def assert_running(self):
        self.host.succeed(f"systemctl is-active {self.unit}.service")

    def stop_cleanly(self, bound):
        """systemctl stop must return within `bound` seconds and the main
        process must exit 0 on its own (not be killed)."""
        start = time.monotonic()
        self.host.succeed(f"systemctl stop {self.unit}")
        elapsed = time.monotonic() - start
        assert elapsed < bound, f"{self.unit}: stop took {elapsed:.1f}s (bound {bound}s)"
        show = lambda p: self.host.succeed(f"systemctl show -P {p} {self.unit}").strip()
        assert show("Result") == "success", f"{self.unit}: Result={show('Result')}"
        assert show("ExecMainCode") == "1", f"{self.unit}: main process did not exit on its own"
        assert show("ExecMainStatus") == "0", f"{self.unit}: exit status {show('ExecMainStatus')}"
        return elapsed

    def reload(self):
        self.host.succeed(f"systemctl reload {self.unit}.service")


class VmRig(Rig):
    systemd = True
    acme_timeout = 240
    cacert = "/etc/runewarp-test/ca.crt"
    # vm-tests/gate.nix: services.runewarp.gate.configFile; the unit's
    # StateDirectory.
    gate_config = "/etc/runewarp-test/gate.toml"
    gate_state_dir = "/var/lib/runewarp-gate"

    def __init__(self, subtest, curl_bin, server, client, backend, visitor, client2=None, acme=None):
        self.subtest = subtest
        # No --max-time: a long download must outlive a stop. Absolute path:
        # a transient unit's PATH is systemd's, not the login shell's.
        self.curl_long = f"{curl_bin} -sS --fail --cacert {self.cacert}"
        self.server, self.client, self.client2 = server, client, client2
        self.backend, self.visitor, self.acme = backend, visitor, acme
        self.big = False

    def log(self, msg):
        print(msg)

    def wait_for_services(self):
        """After start_all(): Pebble and the backend's nginx are up."""
        if self.acme is not None:
            self.acme.wait_for_unit("pebble.service")
            self.acme.wait_for_open_port(14000)
        self.backend.wait_for_unit("nginx.service")

    def start_server(self, config=None):
        self.server.wait_for_unit("runewarp-server.service")
        return Unit(self.server, "runewarp-server")

    def restart_server(self, unit):
        unit.host.succeed(f"systemctl start {unit.unit}.service")
        return unit

    def start_client(self, host, config=None, override=None, ca=None):
        """Hand the Server CA (or the trust root in the file `ca` on `host`)
        to the instance's credential source, then start it."""
        pem = self.server.succeed(f"cat {SERVER_CA}") if ca is None else host.succeed(f"cat {ca}")
        write_file(host, "/run/runewarp-test/server-ca.crt", pem)
        host.succeed("systemctl start runewarp-client-test.service")
        unit = Unit(host, "runewarp-client-test")
        unit.pin = host.succeed("cat /etc/runewarp-test/identity/client-identity.txt").strip()
        return unit

    def start_fresh_client(self):
        """The client node's second instance (passthrough.nix), with an
        identity it creates on first start."""
        self.client.succeed("timeout 60 systemctl start runewarp-client-fresh.service")
        unit = Unit(self.client, "runewarp-client-fresh")
        unit.pin = self.client.succeed(
            f"runewarp client identity show --dir {unit.state}/identity"
        ).strip()
        return unit

    def start_smtp_sink(self, host):
        """The smtp-sink unit of vm-tests/gate.nix (started at boot)."""
        host.wait_for_unit("smtp-sink.service")
        host.wait_for_open_port(2525)
        return "/var/lib/smtp-sink"

    def smtp_password_file(self, role):
        """The SMTP password as LoadCredential hands it to the unit."""
        unit = {"client": "runewarp-client-test", "gate": "runewarp-gate"}[role]
        return f"/run/credentials/{unit}.service/smtp-password"

    def start_gate(self, host):
        host.succeed("systemctl start runewarp-gate.service")
        return Unit(host, "runewarp-gate")

    def pebble_root_file(self, host):
        """Pebble's current root, fetched by and stored on `host`."""
        root = host.wait_until_succeeds(self.curl("https://acme.test:15000/roots/0"))
        write_file(host, "/tmp/pebble-root.pem", root)
        return "/tmp/pebble-root.pem"

    def start_download(self, name):
        """A 128 MiB Visitor download in a transient unit at 1 MiB/s: it
        outlives a stop, and what the path buffered before a cut (several
        MiB) drains well inside download_cut's 30 s."""
        if not self.big:
            self.backend.succeed("dd if=/dev/zero of=/srv/www/big bs=1M count=128")
            self.big = True
        self.visitor.succeed(f"rm -f /tmp/{name}")
        self.visitor.succeed(
            f"systemd-run --unit={name} {self.curl_long} --limit-rate 1m"
            f" -o /tmp/{name} https://app.example.com/big"
        )
        self.visitor.wait_until_succeeds(f"test $(stat -c %s /tmp/{name}) -gt 262144")
        return name

    def download_cut(self, name):
        self.visitor.wait_until_fails(f"systemctl is-active {name}", timeout=30)
        self.visitor.succeed(f"test $(stat -c %s /tmp/{name}) -lt 134217728")
        return "the Visitor's download was cut"
