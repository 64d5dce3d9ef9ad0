#!lua flags=allow-oom
--[[
  End a compaction attempt without a swap, while holding the lease.
  Flags: allow-oom: it runs when Redis memory is full (compaction is what frees memory); its
  writes are a few small fields. Without flags (Redis 6.2) Redis refuses only a script's first
  write that may grow memory, so its first write frees (ZREM).
  Input:
    KEYS[1] shard queue      <prefix>:{<shard>}:q
    KEYS[2] shard running    <prefix>:{<shard>}:run
    KEYS[3] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[4] shard dead set   <prefix>:{<shard>}:dead
    ARGV[1] session id
    ARGV[2] lease token
    ARGV[3] outcome:
              "retry"    the attempt failed: attempts + 1; back to the queue after ARGV[4] ms,
                         or the dead-letter state once attempts reach ARGV[5]
              "requeue"  give the session back untouched (shutdown): queue it again now,
                         attempts unchanged
              "idle"     nothing can be compacted now: idle, and not flagged again until the
                         token total grows by ARGV[7] past today's
    ARGV[4] retry delay (ms)
    ARGV[5] maximum attempts (>= 1)
    ARGV[6] error text or note (kept in meta as last_error for "retry" and "idle"; may be empty)
    ARGV[7] "idle" only: tokens the session must grow by before it is flagged again (optional,
            default 0)
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    the session's new state: "queued", "dead" or "idle"
    error "CS_LEASE ..."   the caller no longer holds the lease (nothing changed)
    error "CS_BADARG ..."  malformed ARGV
]]
local MAX = 9007199254740991  -- 2^53 - 1
local queue, running, meta, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sid, token, outcome = ARGV[1], ARGV[2], ARGV[3]
local delay, max_attempts = tonumber(ARGV[4]), tonumber(ARGV[5])
local margin = tonumber(ARGV[7] or '0')
-- Each number check is written so that NaN (false in every comparison) fails it.
if not sid or sid == '' or not token or token == '' or not ARGV[6]
    or not (delay and delay >= 0 and delay <= MAX and delay % 1 == 0)
    or not (max_attempts and max_attempts >= 1 and max_attempts <= MAX and max_attempts % 1 == 0)
    or not (margin and margin >= 0 and margin <= MAX and margin % 1 == 0)
    or (outcome ~= 'retry' and outcome ~= 'requeue' and outcome ~= 'idle') then
  return redis.error_reply('CS_BADARG release: malformed arguments')
end
if redis.call('HGET', meta, 'lease') ~= token then
  return redis.error_reply('CS_LEASE session ' .. sid .. ': lease lost')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', running, sid)
redis.call('HDEL', meta, 'lease', 'lease_deadline')
local state
if outcome == 'idle' then
  state = 'idle'
  local above = (tonumber(redis.call('HGET', meta, 'token_count')) or 0) + margin
  redis.call('HSET', meta, 'state', state, 'attempts', 0, 'last_error', ARGV[6],
    'reflag_above', math.min(above, MAX))
else
  local attempts = tonumber(redis.call('HGET', meta, 'attempts') or '0')
  if outcome == 'retry' then
    attempts = attempts + 1
    redis.call('HSET', meta, 'attempts', attempts, 'last_error', ARGV[6])
  else
    delay = 0
  end
  if outcome == 'retry' and attempts >= max_attempts then
    state = 'dead'
    redis.call('HSET', meta, 'state', state, 'dead_at', now)
    redis.call('ZADD', dead, now, sid)
  else
    state = 'queued'
    redis.call('ZADD', queue, now + delay, sid)
    redis.call('HSET', meta, 'state', state)
  end
end
return state
