# Both roles and the standalone gate. A host may run the Server, any number
# of Client instances, Runegate, or any mix.
{
  imports = [
    ./server.nix
    ./client.nix
    ./gate.nix
  ];
}
