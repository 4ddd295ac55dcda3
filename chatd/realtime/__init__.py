"""The real-time I/O layer: the socket handler and codec, the hub that writes sockets, pub/sub, group commit,
repair and presence. It drives the pure core and calls storage through the services."""
