"""The Lua scripts of ``chatd.storage.kv``: one string per script, with the keys and arguments it takes.

``NOW_MS`` and ``SWEEP`` are shared prefixes (helper functions) that ``KV`` prepends to the scripts that use
them before registering.  Most keys a script touches are passed in KEYS; the presence scripts (sweep, due)
also build keys inside Lua from a prefix they are given, for rooms and workers they find in Redis.  In a
Redis Cluster every key of one call must be in one slot: the keys passed together share a hash tag, and the
prefix given carries it too (``Keys.presence_prefix``: ``chatd:{presence}:``), so the built keys land in
the same slot (``chatd.core.keys``).  The quota script builds all its keys; its KEYS[1] only routes it.
"""

# KEYS: per connection, the denylist key of its token and its user's connection set
# ARGV: now_ms, expiry_ms, cap, then the connection ids
# Per connection: -1 token revoked; 0 over the per-user cap; 1 registered
CONNECT = """
local out = {}
for i = 1, #ARGV - 3 do
  local deny, conns = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('EXISTS', deny) == 1 then
    out[i] = -1
  else
    redis.call('ZREMRANGEBYSCORE', conns, '-inf', ARGV[1])
    if redis.call('ZCARD', conns) >= tonumber(ARGV[3]) then
      out[i] = 0
    else
      redis.call('ZADD', conns, ARGV[2], ARGV[3 + i])
      redis.call('PEXPIREAT', conns, ARGV[2])
      out[i] = 1
    end
  end
end
return out
"""

# KEYS: zset of event times   ARGV: now_ms, window_ms, limit, unique member
RATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry = tonumber(oldest[2]) + ARGV[2] - ARGV[1]
  if retry < 1 then retry = 1 end
  return {0, retry}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, 0}
"""

# KEYS: the scope's quota prefix (unused: it routes the call to the slot of the counters in a cluster)
# ARGV: key prefix, current slice, slices per window, slice ms, then subject, delta pairs.
# Returns, per subject, the events counted in the window's slices over all workers.
QUOTA_SYNC = """
local prefix, now, slices, slice_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 2 do
  local base = prefix .. ARGV[i] .. ':'
  local delta = tonumber(ARGV[i + 1])
  if delta > 0 then
    local key = base .. now
    redis.call('INCRBY', key, delta)
    redis.call('PEXPIRE', key, slice_ms * (slices + 1))
  end
  local total = 0
  for s = now - slices + 1, now do total = total + tonumber(redis.call('GET', base .. s) or '0') end
  out[#out + 1] = total
end
return out
"""

# Prepended to the presence scripts: their times (grace ends, heartbeat expiries) are Redis' clock, never
# an instance's, so instances whose wall clocks disagree cannot end a grace early or take a live instance
# for dead.  TIME in a script that writes needs effects replication: the default since Redis 5 (the only
# mode since 7, and in Valkey).
NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Prepended to the heartbeat and the retire script: removes every entry of a worker (and the set of
# its rooms); a user left with no entry anywhere is due offline at ``due`` ms.
SWEEP = """
local function sweep(prefix, origin, pending, due)
  local rooms_key = prefix .. 'worker-rooms:' .. origin
  local suffix = ':' .. origin
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local pkey, nkey = prefix .. 'presence:' .. room, prefix .. 'presence-n:' .. room
    for _, field in ipairs(redis.call('HKEYS', pkey)) do
      if string.sub(field, -#suffix) == suffix then
        redis.call('HDEL', pkey, field)
        local user = string.sub(field, 1, #field - #suffix)
        if redis.call('HINCRBY', nkey, user, -1) <= 0 then
          redis.call('HDEL', nkey, user)
          redis.call('ZADD', pending, due, room .. ':' .. user)
          redis.call('HSET', prefix .. 'presence-grace:' .. room, user, 1)
        end
      end
    end
  end
  redis.call('DEL', rooms_key)
end
"""

# A user is online in a room from the announcement of its first entry anywhere (``presence-n``: the
# number of workers with an entry) to the announcement of its offline: through the grace too, while its
# pending entry waits (``presence-grace`` indexes a room's pending users for ``_PRESENCE_VIEWS``).  Each
# announcement bumps the room's revision.

# KEYS: presence, presence-users, worker-rooms, pending offlines, workers, presence revisions, presence-grace
# ARGV: origin, room id, grace ms, then user, delta (+1 / -1) pairs
# Returns {1, revision, the users who came online anywhere...}, or {0} and changes nothing when the
# worker's heartbeat expired or was swept: an entry never exists without a live heartbeat, so whatever
# happens to the worker later (crash, failed shutdown) the sweep removes it.  A user whose last entry
# goes is put on the pending list, due after the grace: back before it (on any worker or instance),
# nobody hears of it.  The revision is bumped only when someone came online (0 otherwise).
PRESENCE_APPLY = """
local origin, room = ARGV[1], ARGV[2]
local now = now_ms()
local beat = redis.call('ZSCORE', KEYS[5], origin)
if not beat or tonumber(beat) < now then return {0} end
local due = now + tonumber(ARGV[3])
local out = {1, 0}
for i = 4, #ARGV, 2 do
  local user, delta = ARGV[i], tonumber(ARGV[i + 1])
  local field = user .. ':' .. origin
  if delta > 0 then
    if redis.call('HSETNX', KEYS[1], field, '1') == 1 then
      if redis.call('HINCRBY', KEYS[2], user, 1) == 1 then
        if redis.call('ZREM', KEYS[4], room .. ':' .. user) == 0 then
          out[#out + 1] = user
        else
          redis.call('HDEL', KEYS[7], user)
        end
      end
      redis.call('SADD', KEYS[3], room)
    end
  elseif redis.call('HDEL', KEYS[1], field) == 1 then
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
      redis.call('HDEL', KEYS[2], user)
      redis.call('ZADD', KEYS[4], due, room .. ':' .. user)
      redis.call('HSET', KEYS[7], user, 1)
    end
  end
end
if #out > 2 then
  out[2] = redis.call('HINCRBY', KEYS[6], room, 1)
end
return out
"""

# KEYS: pending offlines, presence revisions   ARGV: key prefix, limit
# Pops the due entries; returns {room, revision, users...} per room of those still gone: announce them
# offline (with the revision their announcement bumped).
PRESENCE_DUE = """
local rooms, gone = {}, {}
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))) do
  redis.call('ZREM', KEYS[1], entry)
  local sep = string.find(entry, ':', 1, true)
  local room, user = string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1)
  redis.call('HDEL', ARGV[1] .. 'presence-grace:' .. room, user)
  if redis.call('HEXISTS', ARGV[1] .. 'presence-n:' .. room, user) == 0 then
    if not gone[room] then
      gone[room] = {room, 0}
      rooms[#rooms + 1] = room
    end
    gone[room][#gone[room] + 1] = user
  end
end
local out = {}
for _, room in ipairs(rooms) do
  gone[room][2] = redis.call('HINCRBY', KEYS[2], room, 1)
  out[#out + 1] = gone[room]
end
return out
"""

# KEYS: presence revisions, pending offlines, then per room its presence-users and presence-grace hashes
# ARGV: per room, its id and the revision the caller's view is at (-1: unknown)
# Returns {room, revision, online users...} of each room whose revision differs, read at once: the users
# with an entry, and those in their grace (a grace entry whose pending one is gone is dropped: a worker
# of the previous version announced that user offline without knowing the index).
PRESENCE_VIEWS = """
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local room, known = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local rev = tonumber(redis.call('HGET', KEYS[1], room) or '0')
  if rev ~= known then
    local row = {room, rev}
    for _, user in ipairs(redis.call('HKEYS', KEYS[2 * i + 1])) do
      row[#row + 1] = user
    end
    for _, user in ipairs(redis.call('HKEYS', KEYS[2 * i + 2])) do
      if redis.call('ZSCORE', KEYS[2], room .. ':' .. user) then
        row[#row + 1] = user
      else
        redis.call('HDEL', KEYS[2 * i + 2], user)
      end
    end
    out[#out + 1] = row
  end
end
return out
"""

# KEYS: workers, pending offlines   ARGV: origin, ttl ms, key prefix
# Renews this worker's heartbeat, then removes the entries of workers whose heartbeat expired (a
# crashed instance, or one whose shutdown could not retire): their users, if gone everywhere, are due
# offline now.  Returns 1 when this worker was still registered, 0 when its own entries were swept
# meanwhile (it must add them again).
HEARTBEAT = """
local prefix, now = ARGV[3], now_ms()
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for _, origin in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 20)) do
  sweep(prefix, origin, KEYS[2], now)
  redis.call('ZREM', KEYS[1], origin)
end
if old and tonumber(old) >= now then return 1 end
return 0
"""

# KEYS: workers, pending offlines   ARGV: origin, grace ms, key prefix
# Clean shutdown: every entry of the worker and its heartbeat go together (its users, if gone
# everywhere, are due offline after the grace).  Failing, nothing changes: the heartbeat expires
# and the others sweep the entries.
PRESENCE_RETIRE = """
sweep(ARGV[3], ARGV[1], KEYS[2], now_ms() + tonumber(ARGV[2]))
redis.call('ZREM', KEYS[1], ARGV[1])
"""
