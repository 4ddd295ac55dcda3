"""Reference clients of docs/PROTOCOL.md: the pure session state (``session``) and the terminal client."""
