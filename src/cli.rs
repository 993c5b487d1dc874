//! The command line: `runewarp server|client|config|demo` and the material
//! commands. Parsing only; each command is carried out by its module.

// clap turns doc comments into `--help` text and the man pages: an item
// carries one only where help text is meant, so `missing_docs` is off here.
#![allow(missing_docs)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "runewarp",
    version,
    about = "Self-hosted ingress tunnel: publish TLS services behind NAT over QUIC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the public Server, or manage its certificate material.
    Server(ServerArgs),
    /// Run a Client instance, or manage its identity and public certificates.
    Client(ClientArgs),
    /// Run Runegate standalone: email sign-in in front of a private web app
    /// (the `[gate]` section), behind a TLS-terminating proxy.
    Gate(GateArgs),
    /// Run the mesh control server (Runetale's User Management Server:
    /// enrolment, network maps, ACLs), or administer it.
    Control(ControlArgs),
    /// The mesh device agent: enrol this machine and follow its network map.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a complete local demo on loopback: backend, Server, Client, Visitor.
    Demo(DemoArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page runewarp(1) (roff), or write every page.
    Man {
        /// Write runewarp(1) and one page per subcommand into this directory
        /// instead (e.g. share/man/man1).
        #[arg(long = "out-dir", value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
    #[command(flatten)]
    pub run: ServerRunArgs,
}

#[derive(Debug, Args, Default, Clone)]
pub struct ServerRunArgs {
    /// Config file (default: $XDG_CONFIG_HOME/runewarp/config.toml).
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Server hostname (overrides RUNEWARP_SERVER_HOSTNAME and server.hostname).
    #[arg(long = "hostname", value_name = "HOSTNAME")]
    pub hostname: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Manage the Server certificate and its private CA (`cert-dir`).
    #[command(subcommand)]
    Cert(ServerCertCommand),
    /// Print the running Server's state: Tunnels, their connections, streams, bytes, certificate expiry.
    Status(StatusArgs),
}

#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    /// Config file naming the control socket (default: $XDG_CONFIG_HOME/runewarp/config.toml).
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The control socket to read (overrides control-socket from the config).
    #[arg(long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the state as JSON (for scripts) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct MaterialArgs {
    /// Config file to read defaults from (hostname, material directory).
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The material directory.
    #[arg(long = "dir", visible_aliases = ["cert-dir", "identity-dir", "public-cert-dir"], value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ServerCertCommand {
    /// Create a private Server CA and a Server certificate for the hostname.
    Init {
        #[command(flatten)]
        material: MaterialArgs,
        /// Server hostname (falls back to RUNEWARP_SERVER_HOSTNAME, then server.hostname).
        #[arg(long = "hostname")]
        hostname: Option<String>,
        /// Replace existing keys.
        #[arg(long)]
        force: bool,
    },
    /// Reissue the Server certificate from the same CA (new key).
    Renew {
        #[command(flatten)]
        material: MaterialArgs,
        /// Server hostname of the new certificate (default: the current one's).
        #[arg(long = "hostname")]
        hostname: Option<String>,
    },
    /// Replace the private CA and reissue the Server certificate.
    RotateCa {
        #[command(flatten)]
        material: MaterialArgs,
        /// Server hostname of the reissued certificate (default: the current one's).
        #[arg(long = "hostname")]
        hostname: Option<String>,
    },
    /// Print the Server pin (SHA-256 of server.crt's public key, 64 hex
    /// characters) for Clients with server-trust = "pin", and nothing else.
    ShowPin {
        #[command(flatten)]
        material: MaterialArgs,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClientArgs {
    #[command(subcommand)]
    pub command: Option<ClientCommand>,
    #[command(flatten)]
    pub run: ClientRunArgs,
}

#[derive(Debug, Args, Default, Clone)]
pub struct ClientRunArgs {
    /// Config file (default: $XDG_CONFIG_HOME/runewarp/config.toml).
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Server address `host[:port]` (overrides client.server-address).
    #[arg(long = "server-address", value_name = "HOST[:PORT]")]
    pub server_address: Option<String>,
    /// Backend address `host:port` for the sole Service (overrides its backend-address).
    #[arg(long = "backend-address", value_name = "HOST:PORT")]
    pub backend_address: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Manage the Client identity (`identity-dir`).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Manage terminate-mode certificates (`public-cert-dir`).
    #[command(subcommand, name = "public-cert")]
    PublicCert(PublicCertCommand),
    /// Print the running Client instance's state: Tunnel connection, Services, streams, bytes, certificate expiry.
    Status(StatusArgs),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create an Ed25519 identity and print its pin.
    Init {
        #[command(flatten)]
        material: MaterialArgs,
        /// Replace an existing identity.
        #[arg(long)]
        force: bool,
    },
    /// Print the pin (64 hex characters) and nothing else.
    Show {
        #[command(flatten)]
        material: MaterialArgs,
    },
    /// Replace the identity with a new key and print the new pin.
    Rotate {
        #[command(flatten)]
        material: MaterialArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum PublicCertCommand {
    /// Create the Public hostname CA if absent and add a leaf per hostname.
    Init {
        #[command(flatten)]
        material: MaterialArgs,
        /// Public hostname (repeatable).
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// Replace existing leaves for these hostnames.
        #[arg(long)]
        force: bool,
    },
    /// Reissue a hostname's leaf from the same CA.
    Renew {
        #[command(flatten)]
        material: MaterialArgs,
        /// Public hostname whose leaf to reissue (repeatable).
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
    },
    /// Replace the Public hostname CA and reissue every leaf.
    RotateCa {
        #[command(flatten)]
        material: MaterialArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config and print the effective, fully defaulted form.
    Check {
        /// Which section to validate: the Server's, the Client's, the
        /// standalone gate's (`[gate]`) or the mesh control server's
        /// (`[control]`).
        #[arg(long, value_enum)]
        role: Role,
        /// Config file (default: $XDG_CONFIG_HOME/runewarp/config.toml).
        #[arg(short = 'c', long = "config", value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Server,
    Client,
    Gate,
    Control,
}

#[derive(Debug, Args, Clone, Default)]
pub struct GateArgs {
    /// Config file with a [gate] section (default: $XDG_CONFIG_HOME/runewarp/config.toml).
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct DemoArgs {
    /// Leave everything running and print commands to try (Ctrl-C stops
    /// it).
    #[arg(long, global = true)]
    pub(crate) keep_running: bool,
    #[command(subcommand)]
    pub(crate) command: Option<DemoCommand>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum DemoCommand {
    /// The mesh: a control server and three nodes in network namespaces,
    /// pinging each other over WireGuard (needs root).
    Mesh,
}

#[derive(Debug, Args, Clone)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub command: Option<ControlCommand>,
    /// Config file with a [control] section.
    #[arg(short = 'c', long = "config", value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum ControlCommand {
    /// Setup keys enrol devices without a browser (`runewarp node up --setup-key`).
    #[command(subcommand, name = "setup-key")]
    SetupKey(SetupKeyCommand),
    /// List the devices, or revoke one.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// An organisation's ACL policy (JSON).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List the users who signed in (SSO), their groups and admin status.
    Users,
    /// Subnet Connector routes: list them, or approve or revoke one
    /// (an admin's decision beats the policy's `routes` section).
    Routes {
        #[command(subcommand)]
        command: Option<RoutesCommand>,
    },
    /// Print the public key that signs relay tokens, for `[server.relay]
    /// control-key` (the key is made in the state dir on first use).
    #[command(name = "relay-key")]
    RelayKey,
}

#[derive(Debug, Subcommand, Clone)]
pub enum RoutesCommand {
    /// List every route a device advertises or an admin decided on (the
    /// default).
    List,
    /// Approve a route for a device (whether or not the policy does).
    Approve {
        /// The device id (see `devices list`).
        #[arg(long, value_name = "ID")]
        device: i64,
        /// The route, such as 10.0.5.0/24.
        route: String,
    },
    /// Revoke a route of a device: peers drop it with their next map.
    Revoke {
        /// The device id (see `devices list`).
        #[arg(long, value_name = "ID")]
        device: i64,
        /// The route, such as 10.0.5.0/24.
        route: String,
    },
}

#[derive(Debug, Subcommand, Clone)]
pub enum SetupKeyCommand {
    /// Create a setup key; it is printed once and stored only hashed.
    Create {
        /// Enrol devices as this user (their organisation follows from the
        /// email's domain; consumer domains get a personal one).
        #[arg(
            long,
            value_name = "EMAIL",
            conflicts_with = "org",
            required_unless_present = "org"
        )]
        user: Option<String>,
        /// Enrol tagged devices without a user into this organisation.
        #[arg(long, value_name = "NAME")]
        org: Option<String>,
        /// A tag for the devices (repeatable), used by ACLs as `tag:NAME`.
        #[arg(long = "tag", value_name = "NAME")]
        tags: Vec<String>,
        /// The key may enrol many devices (default: one).
        #[arg(long)]
        reusable: bool,
        /// How long the key works, such as 1h or 30m.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        expires: String,
    },
    /// List the setup keys (never the keys themselves: only their hashes
    /// are stored).
    List,
    /// Revoke a setup key: it enrols nothing more (devices it enrolled
    /// stay).
    Revoke {
        /// The key's id (see `setup-key list`).
        id: i64,
    },
}

#[derive(Debug, Subcommand, Clone)]
pub enum DevicesCommand {
    /// List every device (the default).
    List,
    /// Revoke a device: its peers drop it and its map stream ends.
    Revoke {
        /// The device id (see `devices list`).
        id: i64,
    },
}

#[derive(Debug, Subcommand, Clone)]
pub enum PolicyCommand {
    /// Validate FILE and make it the organisation's policy.
    Set {
        /// The organisation (an email domain such as acme.com, or a personal
        /// organisation's email address).
        #[arg(long, value_name = "NAME")]
        org: String,
        /// The policy document (JSON).
        file: PathBuf,
    },
    /// Print the organisation's policy.
    Get {
        /// The organisation.
        #[arg(long, value_name = "NAME")]
        org: String,
    },
}

/// `--endpoint IP:PORT`: a literal address, port not 0, not unspecified
/// or multicast.
fn parse_endpoint(text: &str) -> Result<std::net::SocketAddr, String> {
    match text.parse::<std::net::SocketAddr>() {
        Ok(a) if crate::mesh_protocol::valid_endpoint(text) => Ok(a),
        Ok(_) => Err("the address must be a unicast IP with a port other than 0".into()),
        Err(_) => Err("expected IP:PORT, such as 198.51.100.7:41641".into()),
    }
}

#[derive(Debug, Subcommand, Clone)]
pub enum NodeCommand {
    /// Enrol (first time: with a setup key, or by signing in at the printed
    /// URL) and follow the network map until stopped.
    Up {
        /// The control server, such as https://control.example.com:7443
        /// (remembered after the first time).
        #[arg(long, value_name = "URL")]
        control: Option<String>,
        /// The setup key for the first enrolment (without one: SSO sign-in).
        #[arg(long = "setup-key", value_name = "KEY", env = "RUNEWARP_SETUP_KEY")]
        setup_key: Option<String>,
        /// Read the setup key from this file instead (a systemd credential,
        /// say), so it never shows in the process's arguments or
        /// environment.
        #[arg(
            long = "setup-key-file",
            value_name = "PATH",
            conflicts_with = "setup_key"
        )]
        setup_key_file: Option<PathBuf>,
        /// CA certificate the control server's certificate chains to
        /// (default: the system's roots).
        #[arg(long = "ca-file", value_name = "PATH")]
        ca_file: Option<PathBuf>,
        /// This device's name in the network (default: the host name).
        #[arg(long, value_name = "NAME")]
        hostname: Option<String>,
        /// Run the data plane as well: create this TUN device and carry
        /// WireGuard traffic to the peers (needs CAP_NET_ADMIN). Without
        /// it the node only follows the map.
        #[arg(long, value_name = "NAME")]
        tun: Option<String>,
        /// Serve these subnets as a Subnet Connector (comma-separated
        /// CIDRs such as 10.0.5.0/24; needs --tun, root and nftables): the
        /// control server offers them to peers once approved.
        #[arg(long = "advertise-routes", value_name = "CIDR[,CIDR...]")]
        advertise_routes: Option<String>,
        /// The data plane's UDP port (0: any free port).
        #[arg(
            long = "listen-port",
            value_name = "PORT",
            default_value_t = crate::node::dataplane::DEFAULT_PORT
        )]
        listen_port: u16,
        /// A public address (IP:PORT) this node is reachable at: a port
        /// forward to the listen port, or a NAT that keeps the port.
        /// Offered to peers ahead of the host's addresses, for direct
        /// paths through NAT. Repeatable; needs --tun.
        #[arg(
            long = "endpoint",
            value_name = "IP:PORT",
            requires = "tun",
            value_parser = parse_endpoint
        )]
        endpoint: Vec<std::net::SocketAddr>,
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Print the organisation, this device's addresses and its peers.
    Status {
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Send a short message to a peer through the control server, sealed
    /// for that peer alone (the channel the data plane uses to exchange
    /// connection candidates).
    Signal {
        /// The peer's hostname, as `node status` lists it.
        #[arg(long, value_name = "HOSTNAME")]
        to: String,
        /// The message (at most 2,032 bytes).
        message: String,
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Stop the running `node up` for this state dir; the key and the
    /// enrolment stay, so `node up` resumes without a setup key.
    Down {
        #[command(flatten)]
        state: NodeStateArgs,
    },
    /// Forget the enrolment (the WireGuard key stays).
    Logout {
        #[command(flatten)]
        state: NodeStateArgs,
    },
}

#[derive(Debug, Args, Clone)]
pub struct NodeStateArgs {
    /// Where the key, the enrolment and the network map live.
    #[arg(
        long = "state-dir",
        value_name = "DIR",
        default_value = "/var/lib/runewarp/node"
    )]
    pub state_dir: PathBuf,
}
