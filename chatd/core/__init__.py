"""The pure core: wire frames, errors, envelopes, ordering, key names.

Nothing here imports tornado, redis or psycopg, or does I/O: each module takes values and returns values,
and its tests need no socket and no loop.
"""
