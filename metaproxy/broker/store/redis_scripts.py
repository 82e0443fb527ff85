"""The Lua scripts that make each fleet-wide decision atomic in the store.

Each reads the store's own clock (`TIME`), so replicas whose clocks disagree still share one
timeline, and touches keys of one hash tag only, so it also runs on a Cluster; the two that
name keys of several tags (ADMIT_AND_CLAIM, FILL_INDEXED) run only where one server holds
every key, and a Cluster gets their parts one by one. Times are microseconds.
"""

from __future__ import annotations

from typing import Final

# The store's clock, in microseconds, for the scripts below.
_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# GCRA (the generic cell rate algorithm) as a reservation: each call gets the next slot of the
# budget's timeline and is told how long to wait for it. A burst tolerance lets that many
# microseconds' worth of calls go at once after a quiet spell. Arguments: the timeline key;
# interval_us, tolerance_us, max_ahead_us. Returns the wait in µs, or -(wait) without
# reserving when the slot is further ahead than max_ahead (0: reserve only a slot free now).
_RESERVE_FUNCTION: Final = """
local function reserve(key, interval, tolerance, max_ahead)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local at = tat - tolerance
  if at < now then at = now end
  local wait = at - now
  if wait > max_ahead then return -wait end
  redis.call('SET', key, string.format('%d', tat + interval),
             'PX', math.floor((tat + interval - now) / 1000) + 1000)
  return wait
end
"""

# KEYS[1] timeline; ARGV interval_us, tolerance_us, max_ahead_us.
RESERVE_BUDGET: Final = (
    _NOW
    + _RESERVE_FUNCTION
    + """
return reserve(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
"""
)

# One request's admission: the tenant's rate, the identity's rate (GCRA, refuse rather than
# wait) and a slot under the tenant's in-flight cap (a sorted set of tickets scored by when
# their lease ends, so a replica that dies mid-request frees its slots when the lease ends).
# All three or none are taken. First, the slots of this replica's requests that ended since its
# last admission for the tenant are given back (`released`, tickets separated by spaces): they
# ride with the next admission instead of costing a round trip each. Arguments: the tenant
# timeline, identity timeline and in-flight set; t_interval, t_tolerance, i_interval,
# i_tolerance, cap, ticket, lease_us, released. Returns 0, 0 admitted, or reason, wait_us.
_ADMIT_FUNCTION: Final = """
local function gcra(key, interval, tolerance)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if allow_at > now then return allow_at - now, new_tat end
  return 0, new_tat
end
local function admit(rate, ident, in_flight, a)
  for ended in string.gmatch(a[8], '%S+') do redis.call('ZREM', in_flight, ended) end
  local tw, tnew = gcra(rate, tonumber(a[1]), tonumber(a[2]))
  if tw > 0 then return 1, tw end
  local iw, inew = gcra(ident, tonumber(a[3]), tonumber(a[4]))
  if iw > 0 then return 2, iw end
  redis.call('ZREMRANGEBYSCORE', in_flight, '-inf', now)
  if redis.call('ZCARD', in_flight) >= tonumber(a[5]) then return 3, 1000000 end
  redis.call('SET', rate, string.format('%d', tnew), 'PX', math.floor((tnew - now) / 1000) + 1000)
  redis.call('SET', ident, string.format('%d', inew), 'PX', math.floor((inew - now) / 1000) + 1000)
  redis.call('ZADD', in_flight, string.format('%d', now + tonumber(a[7])), a[6])
  redis.call('PEXPIRE', in_flight, math.floor(tonumber(a[7]) / 1000) + 1000)
  return 0, 0
end
"""

# KEYS tenant timeline, identity timeline, in-flight set; ARGV as `admit` takes them.
# Returns {0, 0} admitted, or {reason, wait_us}.
ADMIT: Final = (
    _NOW
    + _ADMIT_FUNCTION
    + """
local code, wait = admit(KEYS[1], KEYS[2], KEYS[3], ARGV)
return {code, wait}
"""
)

# The replica registry: mark one live until now + ttl, drop the expired, list the live.
# KEYS[1] sorted set; ARGV instance, ttl_us.
HEARTBEAT: Final = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

# Lift a revocation, leave its signed tombstone and tell every replica, in one step. KEYS: the
# revocations and the tombstones; ARGV: field, tombstone, channel, signed message. Returns the
# lifted value, or false (nothing to lift: nothing is written or sent).
LIFT: Final = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return old
"""

# A cache read that takes the single-flight lease when it finds nothing (or, `claim_if_present`
# = "1", when the caller will refresh what it found): one round trip for the usual cold path.
# A caller that finds neither a value nor the lease will wait for the holder's release: it
# says so in the `waiting` key, and only then does the release publish (a cold issue nobody
# else asked for wakes no replica). Arguments: the value, lease and waiting keys; holder,
# ttl_ms, claim_if_present. Returns value or false, 1 if the lease is the holder's.
_CLAIM_FUNCTION: Final = """
local function get_or_claim(value_key, lease, waiting, holder, ttl_ms, claim_if_present)
  local value = redis.call('GET', value_key)
  if value and claim_if_present ~= '1' then return value, 0 end
  local taken = redis.call('SET', lease, holder, 'NX', 'PX', ttl_ms)
  if not taken and redis.call('GET', lease) == holder then taken = true end
  if not taken and not value then
    redis.call('SET', waiting, '1', 'PX', tonumber(ttl_ms) * 2)
  end
  return value, taken and 1 or 0
end
"""

# KEYS value, lease, waiting; ARGV holder, ttl_ms, claim_if_present. Returns {value, taken}.
GET_OR_CLAIM: Final = (
    _CLAIM_FUNCTION
    + """
local value, taken = get_or_claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
return {value, taken}
"""
)

# A cold request's questions in one round trip, where one script may name every key (one
# server or Sentinel): admit it; only if it is admitted, read the shared cache and take the
# lease; and only if it took the lease (an STS call follows), take the budget's slot if one is
# free now (never one ahead: a waiting slot stays for the scheduler's fair order to hand out).
# KEYS the admission's three, the cache's three, then optionally the budget timeline; ARGV the
# admission's eight, the cache's three, then the budget's interval_us and tolerance_us.
# Returns {0, 0, value, taken, slot (1: a budget slot now is the caller's)} or
# {reason, wait_us, false, 0, 0}.
ADMIT_AND_CLAIM: Final = (
    _NOW
    + _ADMIT_FUNCTION
    + _CLAIM_FUNCTION
    + _RESERVE_FUNCTION
    + """
local code, wait = admit(KEYS[1], KEYS[2], KEYS[3], ARGV)
if code ~= 0 then return {code, wait, false, 0, 0} end
local value, taken = get_or_claim(KEYS[4], KEYS[5], KEYS[6], ARGV[9], ARGV[10], ARGV[11])
local slot = 0
if taken == 1 and not value and KEYS[7] then
  if reserve(KEYS[7], tonumber(ARGV[12]), tonumber(ARGV[13]), 0) == 0 then slot = 1 end
end
return {0, 0, value, taken, slot}
"""
)

# Store what the holder fetched (ARGV[2] = "" stores nothing), give the lease back, wake the
# waiters if any said they wait. KEYS value, lease, waiting; ARGV holder, value, ttl_ms,
# channel, message.
FILL: Final = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

# FILL with the owners' index in the same script (KEYS[4..] are the owner sets), where every
# key may be named in one script (one server or Sentinel; a Cluster spreads them over slots).
# An owner set lives as long as the longest value in it could.
FILL_INDEXED: Final = """
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  for i = 4, #KEYS do
    redis.call('SADD', KEYS[i], ARGV[5])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

# The single-flight lease, only by its holder: extend it.
EXTEND_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
