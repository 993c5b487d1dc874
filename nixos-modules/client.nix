# services.runewarp.clients.<name>: Runewarp Client instances.
#
# Each instance keeps one QUIC Tunnel connection to a Server and forwards the
# streams it receives to Local backends. One unit per instance:
# runewarp-client-<name>.service. See docs/nixos.md.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib)
    mkOption
    mkIf
    types
    literalExpression
    ;
  rw = import ./lib.nix { inherit lib; };
  settingsFormat = pkgs.formats.toml { };
  top = config;

  enabledClients = lib.filterAttrs (_: c: c.enable) config.services.runewarp.clients;

  # Runs before the Client on every start: validates the config in use,
  # creates the Client identity when absent and prints its pin to the
  # journal, and creates terminate-mode certificates (private Public hostname
  # CA) for hostnames that have none when `public-cert-dir` is in use.
  prepareFor =
    name: c:
    rw.prepareScript {
      inherit pkgs;
      inherit (c) package;
      unit = "runewarp-client-${name}";
      role = "client";
      runtimeInputs = [ pkgs.gawk ];
      text = ''
        value() { printf '%s\n' "$effective" | sed -n "s/^$1 = \"\(.*\)\"$/\1/p"; }

        identity_dir="$(value identity-dir)"
        if [ ! -e "$identity_dir/client.key" ]; then
          ${
            if c.createMaterial then
              ''
                echo "No Client identity in $identity_dir: creating one"
                runewarp client identity init --dir "$identity_dir" > /dev/null
              ''
            else
              ''
                echo "runewarp-client-${name}: $identity_dir/client.key is missing (createMaterial is off)" >&2
                exit 1
              ''
          }
        fi
        pin="$(runewarp client identity show --dir "$identity_dir")"
        echo "Client identity pin: $pin (pin it in the Server's [[server.tunnels]] client-identity)"

        public_dir="$(value public-cert-dir)"
        if [ -n "$public_dir" ]; then
          # Hostnames of terminating Services, from the effective config
          # (public-hostnames precedes tls-mode in each [[client.services]]).
          hostnames="$(printf '%s\n' "$effective" | awk '
            /^\[\[client\.services\]\]$/ { hosts = ""; next }
            /^public-hostnames = \[/ {
              line = $0
              sub(/^public-hostnames = \[/, "", line); sub(/\]$/, "", line)
              gsub(/[" ]/, "", line); gsub(/,/, " ", line)
              hosts = line; next
            }
            /^tls-mode = "terminate"$/ { print hosts }
          ')"
          for hostname in $hostnames; do
            if [ ! -e "$public_dir/$hostname/public.key" ]; then
              ${
                if c.createMaterial then
                  ''
                    runewarp client public-cert init --dir "$public_dir" --hostname "$hostname"
                  ''
                else
                  ''
                    echo "runewarp-client-${name}: $public_dir/$hostname/public.key is missing (createMaterial is off)" >&2
                    exit 1
                  ''
              }
            fi
          done
        fi
      '';
    };

  instanceModule =
    { name, config, ... }:
    let
      unit = "runewarp-client-${name}";
      stateDir = "/var/lib/${unit}";
      c = config.settings.client;
      terminates = lib.any (svc: svc.tls-mode == "terminate") c.services;

      serviceType = rw.tomlTable settingsFormat.type {
        public-hostnames = rw.nullableOption (types.nonEmptyListOf types.str) {
          description = "Public hostnames this Service answers; null only for a sole catch-all Service.";
        };
        backend-address = mkOption {
          type = types.str;
          example = "127.0.0.1:8443";
          description = "The Local backend, `host:port`.";
        };
        tls-mode = mkOption {
          type = types.enum [
            "passthrough"
            "terminate"
          ];
          default = "passthrough";
          description = "`passthrough`: the backend terminates TLS. `terminate`: the Client does and sends plaintext.";
        };
        proxy-protocol = rw.nullableOption (types.enum [ "v2" ]) {
          description = "Send a PROXY protocol v2 header to the backend.";
        };
        gate = rw.nullableOption gateType {
          example = literalExpression ''{ allowed-domains = [ "example.com" ]; }'';
          description = ''
            Runegate in front of this Service (`[client.services.gate]`):
            email sign-in before any request reaches the backend. Needs
            `tls-mode = "terminate"` and `settings.client.smtp`. See
            docs/gate.md.
          '';
        };
      };

      # `[client.services.gate]`: typed allow-lists, the other gate keys
      # (base-url, link-ttl, session-ttl, session-idle, cookie-domain,
      # state-dir) pass through as TOML.
      gateType = rw.tomlTable settingsFormat.type rw.gateAllowOptions;

      smtpType = rw.smtpType {
        freeformType = settingsFormat.type;
        passwordFile = if config.smtpPasswordFile == null then null else "${config.credentialsDirectory}/smtp-password";
      };

      acmeType = rw.acmeType {
        freeformType = settingsFormat.type;
        inherit stateDir;
      };

      clientSection = rw.tomlTable settingsFormat.type {
        server-address = mkOption {
          type = types.str;
          example = "tunnel.example.com";
          description = "The Server, `host[:port]` (DNS name; UDP port 443 by default).";
        };
        server-trust = mkOption {
          type = types.enum [
            "system"
            "ca-file"
          ];
          default = "system";
          description = "Validate the Server certificate with the system roots or only with `server-ca-file`.";
        };
        server-ca-file = rw.nullableOption types.str {
          example = "/run/credentials/runewarp-client-home.service/server-ca.crt";
          description = "CA bundle for `server-trust = \"ca-file\"` (a private Server CA can come in via `credentials`).";
        };
        identity-dir = mkOption {
          type = types.str;
          default = "${stateDir}/identity";
          description = "Client identity material; created on first start when absent.";
        };
        public-cert-dir = mkOption {
          type = types.nullOr types.str;
          default = if terminates && c.acme == null then "${stateDir}/public-certs" else null;
          defaultText = literalExpression ''if some Service terminates and acme == null then "${stateDir}/public-certs" else null'';
          description = "Terminate-mode certificates (manual path); missing hostnames get a leaf from a private Public hostname CA on start.";
        };
        acme = rw.nullableOption acmeType {
          description = "Obtain terminate-mode certificates via ACME (TLS-ALPN-01 through the Tunnel).";
        };
        metrics-bind-address = rw.nullableOption types.str {
          example = "127.0.0.1:9101";
          description = ''
            Optional Prometheus listener (`GET /metrics`, literal `ip:port`,
            port 1024 or above), off by default. No authentication; never
            opened in the firewall.
          '';
        };
        control-socket = mkOption {
          type = types.str;
          default = "/run/${unit}/control.sock";
          description = "Unix socket (mode 0600) that `runewarp client status --socket PATH` reads; run the command as root.";
        };
        readiness-bind-address = rw.nullableOption types.str {
          example = "127.0.0.1:8082";
          description = ''
            Optional TCP listener (literal `ip:port`, port 1024 or above: the
            unit has no capabilities) that accepts connections only while the
            Tunnel connection is up. The unit itself is started (READY=1) as
            soon as the Client runs and dials. Never opened in the firewall.
          '';
        };
        services = mkOption {
          type = types.nonEmptyListOf serviceType;
          description = "The Services: which Local backend serves which Public hostnames.";
        };
        smtp = rw.nullableOption smtpType {
          description = "`[client.smtp]`: the mail relay for the gates of terminate Services (required exactly when a Service has a `gate`).";
        };
      };
    in
    {
      config.credentials = lib.mkIf (config.smtpPasswordFile != null) {
        "smtp-password" = config.smtpPasswordFile;
      };

      options = rw.roleOptions {
        inherit pkgs unit;
        config = top;
        cfg = config;
        role = "client";
        packageFor = "this instance";
        sectionType = clientSection;
        settingsDescription = ''
          This instance's configuration, mirroring the config file (see
          `runewarp config check --role client`). Paths must be absolute;
          writable material belongs under ${stateDir}, secrets under
          `credentialsDirectory`.
        '';
        credentialsExample = {
          "server-ca.crt" = "/run/secrets/runewarp/server-ca.crt";
        };
        credentialsDescription = ''
          Files passed with systemd `LoadCredential=` (name = absolute path
          outside the Nix store), readable only by this instance under
          `credentialsDirectory`. To bring an existing identity, pass
          `client.key`, `client.crt` and `client-identity.txt` and set
          `settings.client.identity-dir` to `credentialsDirectory`.
        '';
      }
      // {
        smtpPasswordFile = rw.smtpPasswordOption "client";

        enable = mkOption {
          type = types.bool;
          default = true;
          description = "Whether to run this Client instance (unit `${unit}`).";
        };

        createMaterial = mkOption {
          type = types.bool;
          default = true;
          description = "Create a missing Client identity (and missing manual terminate-mode certificates) on start.";
        };
      };
    };

  unitFor =
    name: c:
    let
      unit = "runewarp-client-${name}";
    in
    # READY=1 is sent once the instance is running and dialling the Server,
    # not once connected: a Server that is down or does not know the pin
    # yet (a first deploy) must not hold up the start job or `nixos-rebuild
    # switch`. Connected: the `tunnel_connected` log event, or the Client's
    # readiness-bind-address. `systemctl reload` re-reads Services and
    # terminate certificates on the same Tunnel connection. The control
    # socket: `runewarp client status --socket /run/<unit>/control.sock`,
    # as root.
    lib.nameValuePair unit (
      rw.roleUnit {
        inherit pkgs utils unit;
        cfg = c;
        role = "client";
        description = "Runewarp Client instance ${name}";
        alsoAfter = [ "nss-lookup.target" ];
        prepare = prepareFor name c;
        # Outbound only: no capabilities at all (no lowPorts). The Client
        # closes its Tunnel connection with a short fixed grace.
        serviceConfig.TimeoutStopSec = 20;
      }
    );
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.clients = mkOption {
    type = types.attrsOf (types.submodule instanceModule);
    default = { };
    example = literalExpression ''
      {
        home = {
          settings.client = {
            server-address = "tunnel.example.com";
            services = [
              { public-hostnames = [ "app.example.com" ]; backend-address = "127.0.0.1:8443"; }
            ];
          };
        };
      }
    '';
    description = "Runewarp Client instances, one systemd unit `runewarp-client-<name>` each.";
  };

  config = mkIf (enabledClients != { }) {
    assertions = lib.concatLists (
      lib.mapAttrsToList (
        name: c:
        let
          s = c.settings.client;
        in
        rw.absolutePathAssertions "services.runewarp.clients.${name}.settings.client" {
          inherit (s) identity-dir public-cert-dir server-ca-file;
          acme-state-dir = if s.acme == null then null else s.acme.state-dir;
        }
        ++ [
          {
            assertion = lib.all (cred: rw.credentialName.check cred) (lib.attrNames c.credentials);
            message = "services.runewarp.clients.${name}.credentials: names must be plain file names ([A-Za-z0-9_.-]+).";
          }
          {
            assertion =
              let
                port = rw.portOf s.readiness-bind-address;
              in
              port == null || port >= 1024;
            message = "services.runewarp.clients.${name}.settings.client.readiness-bind-address: the port must be 1024 or above (Client units have no capabilities).";
          }
          {
            assertion =
              let
                port = rw.portOf s.metrics-bind-address;
              in
              port == null || port >= 1024;
            message = "services.runewarp.clients.${name}.settings.client.metrics-bind-address: the port must be 1024 or above (Client units have no capabilities).";
          }
          {
            assertion = lib.all (svc: svc.gate == null || svc.tls-mode == "terminate") s.services;
            message = "services.runewarp.clients.${name}.settings.client.services: a `gate` needs tls-mode = \"terminate\" on its Service (with passthrough the Client never sees the HTTP requests the gate checks).";
          }
          {
            assertion = (s.smtp != null) == lib.any (svc: svc.gate != null) s.services;
            message = "services.runewarp.clients.${name}.settings.client.smtp: set it exactly when some Service has a `gate` (the gates send sign-in links by mail).";
          }
          {
            assertion = builtins.match "[A-Za-z0-9_.-]+" name != null;
            message = "services.runewarp.clients: instance name \"${name}\" must be a plain unit-name fragment ([A-Za-z0-9_.-]+).";
          }
        ]
      ) enabledClients
    );

    environment.systemPackages = lib.unique (lib.mapAttrsToList (_: c: c.package) enabledClients);

    systemd.services = lib.mapAttrs' unitFor enabledClients;
  };
}
