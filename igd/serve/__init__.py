"""The daemon: its socket, connections, ops, memory budget, access rules and systemd glue."""
