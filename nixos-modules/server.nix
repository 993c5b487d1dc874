# services.runewarp.server: the public Runewarp edge.
#
# The Server accepts Visitor TLS on a TCP listener, selects a Tunnel by SNI
# and forwards the untouched bytes over the Client's QUIC Tunnel connection
# (UDP listener). See docs/nixos.md.
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
    mkEnableOption
    mkIf
    types
    literalExpression
    ;
  rw = import ./lib.nix { inherit lib; };
  cfg = config.services.runewarp.server;
  settingsFormat = pkgs.formats.toml { };

  unit = "runewarp-server";
  stateDir = "/var/lib/${unit}";

  s = cfg.settings.server;

  publicPort = rw.portOf s.public-bind-address;
  tunnelPort = rw.portOf s.tunnel-bind-address;
  readinessPort = rw.portOf s.readiness-bind-address;
  metricsPort = rw.portOf s.metrics-bind-address;
  # `[server.relay]` (freeform): the mesh relay's UDP port, default 3478.
  relayPort = if s ? relay then rw.portOf (s.relay.listen or "0.0.0.0:3478") else null;
  boundPorts = lib.filter (p: p != null) [
    publicPort
    tunnelPort
    readinessPort
    metricsPort
  ];
  needsLowPort = lib.any (p: p < 1024) boundPorts;

  graceSeconds = rw.durationSeconds s.graceful-shutdown-duration;

  # Runs before the Server on every start: validates the config actually in
  # use (it may be a runtime file, see `configFile`), creates the private
  # Server CA and certificate when manual material is chosen and absent, and
  # prints the Server CA fingerprint to the journal.
  prepare = rw.prepareScript {
    inherit pkgs unit;
    inherit (cfg) package;
    role = "server";
    runtimeInputs = [ pkgs.openssl ];
    text = ''
      cert_dir="$(printf '%s\n' "$effective" | sed -n 's/^cert-dir = "\(.*\)"$/\1/p')"
      if [ -z "$cert_dir" ]; then
        echo "Server certificate: ACME ([server.acme]); obtained by the Server itself"
        exit 0
      fi
      if [ ! -e "$cert_dir/server.key" ]; then
        ${
          if cfg.createMaterial then
            ''
              echo "No Server certificate in $cert_dir: creating a private Server CA and certificate"
              runewarp server cert init -c "$config"
            ''
          else
            ''
              echo "runewarp-server: $cert_dir/server.key is missing (createMaterial is off)" >&2
              exit 1
            ''
        }
      fi
      if [ -e "$cert_dir/server-ca.crt" ]; then
        fingerprint="$(openssl x509 -in "$cert_dir/server-ca.crt" -noout -fingerprint -sha256 | cut -d= -f2)"
        echo "Server CA SHA-256 fingerprint: $fingerprint (Clients trust $cert_dir/server-ca.crt with server-trust = \"ca-file\")"
      fi
    '';
  };

  tunnelType = rw.tomlTable settingsFormat.type {
    public-hostnames = mkOption {
      type = types.nonEmptyListOf types.str;
      example = [ "app.example.com" ];
      description = "Public hostnames the Server routes into this Tunnel (exact DNS names).";
    };
    client-identity = rw.nullableOption (types.strMatching "[0-9a-f]{64}") {
      description = "The pinned Client identity (64 lowercase hex), as printed by `runewarp client identity show`.";
    };
    client-identities = rw.nullableOption (types.listOf (types.strMatching "[0-9a-f]{64}")) {
      description = "Several pinned Client identities (instead of `client-identity`).";
    };
  };

  acmeType = rw.acmeType {
    freeformType = settingsFormat.type;
    inherit stateDir;
  };

  serverSection = rw.tomlTable settingsFormat.type {
    hostname = mkOption {
      type = types.str;
      example = "tunnel.example.com";
      description = "The Server hostname: the DNS name Clients dial and the Server certificate names.";
    };
    public-bind-address = mkOption {
      type = types.str;
      default = "0.0.0.0:443";
      description = "TCP listener for Visitor TLS (literal `ip:port`).";
    };
    tunnel-bind-address = mkOption {
      type = types.str;
      default = "0.0.0.0:443";
      description = "UDP listener for QUIC Tunnel connections (literal `ip:port`).";
    };
    readiness-bind-address = rw.nullableOption types.str {
      example = "127.0.0.1:8081";
      description = "Optional TCP listener whose accept means ready (never opened in the firewall).";
    };
    metrics-bind-address = rw.nullableOption types.str {
      example = "127.0.0.1:9100";
      description = ''
        Optional Prometheus listener (`GET /metrics`, literal `ip:port`),
        off by default. It has no authentication and is never opened in the
        firewall: scrape it locally, or open the port yourself for a
        trusted scraper.
      '';
    };
    control-socket = mkOption {
      type = types.str;
      default = "/run/${unit}/control.sock";
      description = ''
        Unix socket (mode 0600) that `runewarp server status --socket PATH`
        reads; run the command as root.
      '';
    };
    graceful-shutdown-duration = mkOption {
      type = types.str;
      default = "60s";
      description = "Grace period on shutdown (`ms|s|m|h`); also sizes the unit's TimeoutStopSec.";
    };
    cert-dir = mkOption {
      type = types.nullOr types.str;
      default = if s.acme == null then "${stateDir}/certs" else null;
      defaultText = literalExpression ''if acme == null then "${stateDir}/certs" else null'';
      description = ''
        Manual Server certificate material (`server.crt`, `server.key`,
        `server-ca.crt`, `state/`). Created on first start when absent
        (see `createMaterial`). To bring your own material without the Nix
        store, pass the files as `credentials` named `server.crt`,
        `server.key` and `server-ca.crt` and set this to
        `config.services.runewarp.server.credentialsDirectory`.
      '';
    };
    acme = rw.nullableOption acmeType {
      description = "Obtain the Server certificate via ACME (TLS-ALPN-01 on the public listener) instead of `cert-dir`.";
    };
    tunnels = mkOption {
      type = types.listOf tunnelType;
      default = [ ];
      description = "The Tunnels: explicit Public hostnames and the pinned Client identities allowed to serve them.";
    };
  };
in
{
  imports = [ ./common.nix ];

  options.services.runewarp.server = rw.roleOptions {
    inherit config pkgs cfg;
    role = "server";
    packageFor = "the Server";
    sectionType = serverSection;
    settingsDescription = ''
      The Server configuration, mirroring the config file (see
      `runewarp config check --role server`). Unknown keys are rejected by
      the build-time check. Paths must be absolute; material directories
      belong under ${stateDir} (the only writable place) or the
      credentials directory.
    '';
    settingsExample = literalExpression ''
      {
        server = {
          hostname = "tunnel.example.com";
          tunnels = [
            {
              public-hostnames = [ "app.example.com" ];
              client-identity = "6617b06d7075cd58f366bae3b69ba9e2e4ebc7e4b7f4561fd8f0a8c45701ed83";
            }
          ];
        };
      }
    '';
    credentialsExample = {
      "server.key" = "/run/secrets/runewarp/server.key";
    };
    credentialsDescription = ''
      Files passed to the unit with systemd `LoadCredential=` (name =
      absolute path outside the Nix store). They appear read-only, owned by
      the service user, under `credentialsDirectory`; refer to them from
      `settings` by that path.
    '';
  }
  // {
    enable = mkEnableOption "the Runewarp Server (public ingress edge)";

    createMaterial = mkOption {
      type = types.bool;
      default = true;
      description = ''
        On start, when `cert-dir` is in use and holds no `server.key`, create a
        private Server CA and Server certificate (`runewarp server cert init`).
      '';
    };

    openFirewall = rw.openFirewallOption "Open the TCP port of `public-bind-address`, the UDP port of `tunnel-bind-address` and, with `[server.relay]`, the relay's UDP `listen` port.";
  };

  config = mkIf cfg.enable {
    assertions =
      rw.absolutePathAssertions "services.runewarp.server.settings.server" {
        inherit (s) cert-dir;
        acme-state-dir = if s.acme == null then null else s.acme.state-dir;
      }
      ++ [
        {
          assertion = publicPort != null && tunnelPort != null;
          message = "services.runewarp.server: public-bind-address and tunnel-bind-address must be literal ip:port addresses.";
        }
        {
          assertion = lib.all (name: rw.credentialName.check name) (lib.attrNames cfg.credentials);
          message = "services.runewarp.server.credentials: names must be plain file names ([A-Za-z0-9_.-]+).";
        }
      ];

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = [ publicPort ];
      allowedUDPPorts = [ tunnelPort ] ++ lib.optional (relayPort != null) relayPort;
    };

    environment.systemPackages = [ cfg.package ];

    # READY=1 is sent once both listeners are bound. `systemctl reload`
    # re-reads the config file (Tunnels, hostnames, pins) without dropping
    # untouched Tunnels.
    systemd.services.${unit} = rw.roleUnit {
      inherit
        pkgs
        utils
        cfg
        prepare
        ;
      role = "server";
      description = "Runewarp Server (public ingress edge)";
      lowPorts = needsLowPort;
      serviceConfig = {
        # The grace period plus time to close listeners and exit.
        TimeoutStopSec = if graceSeconds == null then 90 else graceSeconds + 15;
      };
    };
  };
}
