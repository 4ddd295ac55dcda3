"""Domain services shared by the socket and REST handlers: accounts, rooms, files, search, admin, limits.

They hold the rules; storage holds the SQL and the Redis commands."""
