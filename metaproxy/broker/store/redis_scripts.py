"""The Lua scripts that make each fleet-wide decision atomic in the store.

Each reads the store's own clock (`TIME`), so replicas whose clocks disagree still share one
timeline, and touches keys of one hash tag only, so it also runs on a Cluster.
Times are microseconds.
"""

from __future__ import annotations

from typing import Final

# GCRA (the generic cell rate algorithm) as a reservation: each call gets the next slot of the
# budget's timeline and is told how long to wait for it. A burst tolerance of `tol` lets that
# many microseconds' worth of calls go at once after a quiet spell.
# KEYS[1] timeline; ARGV interval_us, tolerance_us, max_ahead_us.
# Returns the wait in µs, or -(wait) without reserving when the slot is further than max_ahead.
RESERVE_BUDGET: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local at = tat - tonumber(ARGV[2])
if at < now then at = now end
local wait = at - now
if wait > tonumber(ARGV[3]) then return -wait end
redis.call('SET', KEYS[1], string.format('%d', tat + interval),
           'PX', math.floor((tat + interval - now) / 1000) + 1000)
return wait
"""

# One request's admission: the tenant's rate, the identity's rate (GCRA, refuse rather than
# wait) and a slot under the tenant's in-flight cap (a sorted set of tickets scored by when
# their lease ends, so a replica that dies mid-request frees its slots when the lease ends).
# All three or none are taken.
# KEYS tenant timeline, identity timeline, in-flight set.
# ARGV t_interval, t_tolerance, i_interval, i_tolerance, cap, ticket, lease_us.
# Returns {0, ''} admitted, or {reason, wait_us}.
ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, interval, tolerance)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if allow_at > now then return allow_at - now, new_tat end
  return 0, new_tat
end
local tw, tnew = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if tw > 0 then return {1, tw} end
local iw, inew = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if iw > 0 then return {2, iw} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return {3, 1000000} end
redis.call('SET', KEYS[1], string.format('%d', tnew), 'PX', math.floor((tnew - now) / 1000) + 1000)
redis.call('SET', KEYS[2], string.format('%d', inew), 'PX', math.floor((inew - now) / 1000) + 1000)
local lease = now + tonumber(ARGV[7])
redis.call('ZADD', KEYS[3], string.format('%d', lease), ARGV[6])
redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[7]) / 1000) + 1000)
return {0, 0}
"""

# The replica registry: mark one live until now + ttl, drop the expired, list the live.
# KEYS[1] sorted set; ARGV instance, ttl_us.
HEARTBEAT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Lift a revocation and tell every replica, in one step. KEYS[1] hash; ARGV field, channel,
# message (the message is completed with the lifted entry by the caller's listener).
LIFT: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], '{"action":"lift","revocation":' .. old .. '}')
return old
"""

# A cache read that takes the single-flight lease when it finds nothing (or, ARGV[3] = "1",
# when the caller will refresh what it found): one round trip for the usual cold path.
# KEYS value, lease; ARGV holder, ttl_ms, claim_if_present. Returns {value or false, taken}.
GET_OR_CLAIM: Final = """
local value = redis.call('GET', KEYS[1])
if value and ARGV[3] ~= '1' then return {value, 0} end
local taken = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
if not taken and redis.call('GET', KEYS[2]) == ARGV[1] then taken = true end
return {value, taken and 1 or 0}
"""

# Store what the holder fetched (ARGV[2] = "" stores nothing), give the lease back, wake the
# waiters. KEYS value, lease; ARGV holder, value, ttl_ms, channel, message.
FILL: Final = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# FILL with the owners' index in the same script (KEYS[3..] are the owner sets), where every
# key may be named in one script (one server or Sentinel; a Cluster spreads them over slots).
# An owner set lives as long as the longest value in it could.
FILL_INDEXED: Final = """
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  for i = 3, #KEYS do
    redis.call('SADD', KEYS[i], ARGV[5])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# The single-flight lease, only by its holder: extend it.
EXTEND_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
