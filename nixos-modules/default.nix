# Every role: the Server, Client instances, the standalone gate, the mesh
# control server and the mesh node. A host may run any mix.
{
  imports = [
    ./server.nix
    ./client.nix
    ./gate.nix
    ./control.nix
    ./node.nix
  ];
}
