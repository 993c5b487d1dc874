# Building blocks shared by the VM tests: node modules and `test`, which runs a
# scenario from ./scenarios on them.
#
# Network: every node maps tunnel.example.com, app.example.com and
# other.example.com to the `server` node and acme.test to the `acme` node (when
# present). Backend node: nginx with TLS (app.example.com cert from pki.nix)
# on 8443 ("backend-1") and 8444 ("backend-2"), plain HTTP on 8080
# ("plain-http-backend"), and /big for long transfers.
{
  pkgs,
  lib,
  runewarpModule,
  package,
}:
let
  pki = import ./pki.nix { inherit pkgs; };
  readConfig = file: builtins.fromTOML (builtins.readFile file);
  identity = ./material/client-identity;
in
rec {
  inherit pki;

  defaults =
    { nodes, ... }:
    {
      imports = [ runewarpModule ];
      services.runewarp.package = package;
      networking.extraHosts = ''
        ${nodes.server.networking.primaryIPAddress} tunnel.example.com app.example.com other.example.com
      ''
      + lib.optionalString (nodes ? acme) ''
        ${nodes.acme.networking.primaryIPAddress} acme.test
      '';
      environment.systemPackages = [
        pkgs.curl
        pkgs.openssl
      ];
      environment.etc."runewarp-test/ca.crt".source = "${pki}/ca.crt";
    };

  # The Server from a TOML file under ./configs, with per-test overrides.
  server =
    {
      config ? ./configs/server.toml,
      override ? { },
    }:
    {
      services.runewarp.server = {
        enable = true;
        openFirewall = true;
        settings = lib.recursiveUpdate (readConfig config) override;
      };
    };

  # A Client instance named "test" from a TOML file under ./configs. The
  # pinned test identity and the Server CA come in with LoadCredential; the
  # CA file is written by the test script (install_server_ca), so the unit
  # is started by the script, not at boot.
  client =
    {
      config ? ./configs/client-passthrough.toml,
      override ? { },
    }:
    {
      environment.etc = {
        "runewarp-test/identity/client.key".source = "${identity}/client.key";
        "runewarp-test/identity/client.crt".source = "${identity}/client.crt";
        "runewarp-test/identity/client-identity.txt".source = "${identity}/client-identity.txt";
      };
      services.runewarp.clients.test = {
        settings = lib.recursiveUpdate (readConfig config) override;
        credentials = {
          "client.key" = "/etc/runewarp-test/identity/client.key";
          "client.crt" = "/etc/runewarp-test/identity/client.crt";
          "client-identity.txt" = "/etc/runewarp-test/identity/client-identity.txt";
          "server-ca.crt" = "/run/runewarp-test/server-ca.crt";
        };
      };
      systemd.services.runewarp-client-test.wantedBy = lib.mkForce [ ];
    };

  backend = {
    networking.firewall.allowedTCPPorts = [
      8443
      8444
      8080
    ];
    systemd.tmpfiles.rules = [ "d /srv/www 0755 root root -" ];
    services.nginx =
      let
        tlsHost = port: body: {
          onlySSL = true;
          listen = [
            {
              addr = "0.0.0.0";
              inherit port;
              ssl = true;
            }
          ];
          sslCertificate = "${pki}/app.example.com.crt";
          sslCertificateKey = "${pki}/app.example.com.key";
          locations."/".extraConfig = ''
            default_type text/plain;
            return 200 "${body}";
          '';
          locations."/big".root = "/srv/www";
        };
      in
      {
        enable = true;
        virtualHosts = {
          "backend-1" = tlsHost 8443 "backend-1";
          "backend-2" = tlsHost 8444 "backend-2";
          "plain" = {
            listen = [
              {
                addr = "0.0.0.0";
                port = 8080;
              }
            ];
            locations."/".extraConfig = ''
              default_type text/plain;
              return 200 "plain-http-backend";
            '';
          };
        };
      };
  };

  # Pebble with the shared config in ../pebble.
  acme = {
    networking.firewall.allowedTCPPorts = [
      14000
      15000
    ];
    environment.etc."pebble/wfe.crt".source = "${pki}/acme.test.crt";
    environment.etc."pebble/wfe.key".source = "${pki}/acme.test.key";
    systemd.services.pebble = {
      description = "Pebble ACME test server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = {
        PEBBLE_VA_NOSLEEP = "1";
        PEBBLE_WFE_NONCEREJECT = "0";
      };
      serviceConfig = {
        ExecStart = "${lib.getExe' pkgs.pebble "pebble"} -config ${../pebble/pebble-config.json}";
        DynamicUser = true;
      };
    };
  };

  visitor = { };

  # A VM test with the usual nodes: `server` and `client` (from the
  # functions above, unless `nodes` replaces them), `backend`, `visitor`,
  # and `acme` when `withAcme`. Its script runs `scenario` (a file in
  # ./scenarios, shared with the namespace driver vm-tests/netns/run) on the
  # VM driver's Rig (./scenarios/vm.py).
  test =
    {
      name,
      scenario,
      nodes ? { },
      withAcme ? false,
    }:
    let
      allNodes = {
        server = server { };
        client = client { };
        inherit backend visitor;
      }
      // lib.optionalAttrs withAcme { inherit acme; }
      // nodes;
      nodeArgs = lib.concatMapStringsSep ", " (n: "${n}=${n}") (lib.attrNames allNodes);
    in
    pkgs.testers.runNixOSTest {
      inherit name defaults;
      nodes = allNodes;
      testScript = lib.concatStringsSep "\n" [
        (builtins.readFile ./scenarios/rig.py)
        (builtins.readFile ./scenarios/vm.py)
        (builtins.readFile scenario)
        ''
          t = VmRig(subtest, "${lib.getExe pkgs.curl}", ${nodeArgs})
          start_all()
          t.wait_for_services()
          scenario(t)
        ''
      ];
    };
}
