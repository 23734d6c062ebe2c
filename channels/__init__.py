"""Socket.IO: the hub (server, auth on connect, subscribe/replay) and one module per namespace."""
