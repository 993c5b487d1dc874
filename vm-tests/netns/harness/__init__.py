"""The namespace driver's modules; vm-tests/netns/run is the entry point."""
