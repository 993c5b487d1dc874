# Runegate in both shapes, with a small SMTP sink on the client node that
# stores every mail (and the AUTH credentials it was sent with) in
# /var/lib/smtp-sink:
# - on a terminate Service: the Visitor's TLS ends in Client instance
#   "test", whose gate signs alice in by mail and then proxies to the plain
#   HTTP backend; the SMTP password arrives through LoadCredential;
# - standalone (services.runewarp.gate) on the client node in front of the
#   same backend, signing in with the mailed code; a reload that drops the
#   address ends the session.
{
  pkgs,
  lib,
  common,
}:
let
  # Just enough SMTP for lettre: EHLO (advertising AUTH PLAIN), AUTH,
  # MAIL, RCPT, DATA, QUIT. Loopback only.
  smtpSink = pkgs.writeText "smtp-sink.py" ''
    import base64, itertools, os, socketserver

    OUT = "/var/lib/smtp-sink"
    counter = itertools.count()


    class Session(socketserver.StreamRequestHandler):
        def reply(self, line):
            self.wfile.write(line.encode() + b"\r\n")

        def handle(self):
            auth, rcpts = "-", []
            self.reply("220 sink ESMTP")
            while True:
                line = self.rfile.readline().decode(errors="replace").strip()
                if not line:
                    return
                verb = line.split(" ")[0].upper()
                if verb in ("EHLO", "HELO"):
                    self.reply("250-sink")
                    self.reply("250 AUTH PLAIN")
                elif verb == "AUTH":
                    parts = base64.b64decode(line.split(" ")[2]).split(b"\0")
                    auth = parts[1].decode() + ":" + parts[2].decode()
                    self.reply("235 ok")
                elif verb == "RCPT":
                    rcpts.append(line.split(":", 1)[1].strip(" <>"))
                    self.reply("250 ok")
                elif verb == "DATA":
                    self.reply("354 go on")
                    body = []
                    while True:
                        data = self.rfile.readline()
                        if data in (b".\r\n", b".\n", b""):
                            break
                        body.append(data.decode(errors="replace"))
                    path = os.path.join(OUT, "%03d.eml" % next(counter))
                    with open(path + ".tmp", "w") as f:
                        f.write("X-Auth: %s\nX-Rcpt: %s\n" % (auth, ",".join(rcpts)))
                        f.write("".join(body))
                    os.rename(path + ".tmp", path)
                    self.reply("250 queued")
                elif verb == "QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("250 ok")


    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer(("127.0.0.1", 2525), Session).serve_forever()
  '';
  smtp = {
    host = "127.0.0.1";
    port = "2525";
    tls = "none";
    username = "signin@example.com";
    from = "Sign-in <signin@example.com>";
  };
in
pkgs.testers.runNixOSTest {
  name = "runewarp-gate";
  inherit (common) defaults;
  nodes = {
    server = common.server { };
    client = {
      imports = [
        (common.client {
          override.client = {
            services = [
              {
                public-hostnames = [ "app.example.com" ];
                backend-address = "backend:8080";
                tls-mode = "terminate";
                gate.allowed-emails = [ "alice@example.com" ];
              }
            ];
            inherit smtp;
          };
        })
      ];
      services.runewarp.clients.test.smtpPasswordFile = "/etc/runewarp-test/smtp-password";
      environment.etc."runewarp-test/smtp-password".text = "sink-secret\n";

      services.runewarp.gate = {
        enable = true;
        smtpPasswordFile = "/etc/runewarp-test/smtp-password";
        configFile = "/etc/runewarp-test/gate.toml";
        # Also rendered to the file above, which the test edits to reload.
        settings.gate = {
          upstream = "http://backend:8080";
          base-url = "http://localhost:7870";
          allowed-emails = [ "bob@example.com" ];
          inherit smtp;
        };
      };
      systemd.services.runewarp-gate.wantedBy = lib.mkForce [ ];

      systemd.services.smtp-sink = {
        description = "SMTP sink for the gate tests";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          ExecStart = "${pkgs.python3}/bin/python3 ${smtpSink}";
          StateDirectory = "smtp-sink";
        };
      };
    };
    backend = common.backend;
    visitor = common.visitor;
  };

  testScript = ''
    import re

    ${common.helpers}

    APP = "https://app.example.com"
    GATE = "http://localhost:7870"


    def http(machine, url, cookies, data=None):
        """One request without redirects: (status, headers text, body); Set-Cookie goes into cookies."""
        jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
        cmd = f"curl -sS -k -i --max-time 10 -H 'Cookie: {jar}' '{url}'"
        if data is not None:
            cmd += " --data '" + "&".join(f"{k}={v}" for k, v in data.items()) + "'"
        out = machine.succeed(cmd)
        head, _, body = out.replace("\r\n", "\n").partition("\n\n")
        status = int(head.split("\n")[0].split(" ")[1])
        for m in re.finditer(r"(?im)^set-cookie: ([^=]+)=([^;]*)", head):
            cookies[m.group(1)] = m.group(2)
        return status, head, body


    def field(body, name):
        return re.search(f'name="{name}" value="([^"]*)"', body).group(1)


    def mail(machine, n):
        path = f"/var/lib/smtp-sink/{n:03d}.eml"
        machine.wait_until_succeeds(f"test -e {path}", timeout=60)
        return machine.succeed(f"cat {path}").replace("=\r\n", "").replace("=\n", "").replace("=3D", "=")


    def ask(machine, base, email, cookies):
        status, _, body = http(machine, f"{base}/private", cookies)
        assert status == 401, (status, body)
        data = {"email": email, "csrf": field(body, "csrf"), "next": "/private"}
        status, _, body = http(machine, f"{base}/_runewarp/gate/sign-in", cookies, data)
        assert status == 200 and "Check your mail" in body, (status, body)
        return body


    start_all()
    backend.wait_for_unit("nginx.service")
    server.wait_for_unit("runewarp-server.service")
    client.wait_for_unit("smtp-sink.service")
    client.wait_for_open_port(2525)

    with subtest("A gated terminate Service signs in by mailed link, then proxies"):
        install_server_ca(server, client)
        client.succeed("systemctl start runewarp-client-test.service")
        wait_for_log(server, "runewarp-server", "tunnel_connected")
        wait_for_log(client, "runewarp-client-test", "gate_ready")
        visitor.wait_until_succeeds(f"curl -sk -o /dev/null -w '%{{http_code}}' {APP}/ | grep -q 401")
        cookies = {}
        ask(visitor, APP, "alice@example.com", cookies)
        text = mail(client, 0)
        assert "X-Auth: signin@example.com:sink-secret" in text, text
        assert "X-Rcpt: alice@example.com" in text, text
        token = re.search(r"token=([A-Za-z0-9_-]{43})", text).group(1)
        status, _, body = http(visitor, f"{APP}/_runewarp/gate/link?token={token}", cookies)
        assert status == 200 and "Press the button" in body, body
        status, head, _ = http(
            visitor, f"{APP}/_runewarp/gate/link", cookies, {"token": token, "csrf": field(body, "csrf")}
        )
        assert status == 303 and "location: /private" in head.lower(), head
        status, _, body = http(visitor, f"{APP}/", cookies)
        assert status == 200 and body.strip() == "plain-http-backend", (status, body)
        # Without the cookie: the sign-in page again.
        status, _, _ = http(visitor, f"{APP}/", {})
        assert status == 401

    with subtest("The standalone gate signs in by code and revokes on reload"):
        client.succeed(
            "cat > /etc/runewarp-test/gate.toml <<'EOF'\n"
            "[gate]\n"
            'upstream = "http://backend:8080"\n'
            'base-url = "http://localhost:7870"\n'
            'allowed-emails = ["bob@example.com"]\n'
            'state-dir = "/var/lib/runewarp-gate"\n'
            "[gate.smtp]\n"
            'host = "127.0.0.1"\nport = "2525"\ntls = "none"\n'
            'username = "signin@example.com"\n'
            'password-file = "/run/credentials/runewarp-gate.service/smtp-password"\n'
            'from = "signin@example.com"\n'
            "EOF"
        )
        client.succeed("systemctl start runewarp-gate.service")
        client.wait_for_open_port(7870)
        cookies = {}
        page = ask(client, GATE, "bob@example.com", cookies)
        text = mail(client, 1)
        code = re.search(r"waiting page: ([0-9]{6})", text).group(1)
        status, _, _ = http(client, f"{GATE}/_runewarp/gate/code", cookies, {"code": code, "csrf": field(page, "csrf")})
        assert status == 303, status
        status, _, body = http(client, f"{GATE}/private", cookies)
        assert status == 200 and body.strip() == "plain-http-backend", (status, body)
        # bob leaves the allow-list; a reload ends his session.
        client.succeed("sed -i 's/bob@example.com/carol@example.com/' /etc/runewarp-test/gate.toml")
        client.succeed("systemctl reload runewarp-gate.service")
        wait_for_log(client, "runewarp-gate", "gate_reloaded")
        status, _, _ = http(client, f"{GATE}/private", cookies)
        assert status == 401, status

    with subtest("Gate units are sandboxed"):
        props = client.succeed("systemctl show -p DynamicUser,ProtectSystem,Type runewarp-gate")
        for want in ["DynamicUser=yes", "ProtectSystem=strict", "Type=notify"]:
            assert want in props, props
  '';
}
