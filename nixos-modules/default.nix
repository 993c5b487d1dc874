# Both roles. A host may run the Server, any number of Client instances, or
# both.
{
  imports = [
    ./server.nix
    ./client.nix
  ];
}
