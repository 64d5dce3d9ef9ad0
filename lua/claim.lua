#!lua flags=allow-oom
--[[
  Claim a flagged session for compaction: move it from its shard queue to the running set
  with a lease deadline and a lease token that fences every later write of the claimer.
  The caller picks the candidate (ZRANGEBYSCORE on the queue) so that every key is in KEYS.
  Flags: allow-oom: it runs when Redis memory is full (compaction is what frees memory); its
  writes are a few small fields. Without flags (Redis 6.2) Redis refuses only a script's first
  write that may grow memory, so its first write frees (ZREM).
  Input:
    KEYS[1] shard queue      <prefix>:{<shard>}:q
    KEYS[2] shard running    <prefix>:{<shard>}:run
    KEYS[3] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    ARGV[1] session id
    ARGV[2] lease length (ms, an integer in 1..2^53-1)
    ARGV[3] lease token (random, unique per claim)
  A retry of the same call (same token: its reply was lost, e.g. to a timeout while the server
  was frozen, and redis-py sent it again) answers the claim it made, instead of {0}, which
  would leave the session running under a lease nobody works on until it expires.
  Output:
    {1, attempts, epoch, lease deadline (ms), queued-at (ms), token limit}  claimed
    {0}   not claimable: not in the queue (another daemon won) or not due yet (backoff)
    {-1}  the session no longer exists; its stale queue entry was removed
    error "CS_BADARG ..."  malformed ARGV
]]
local queue, running, meta = KEYS[1], KEYS[2], KEYS[3]
local sid, lease_ms, token = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if not sid or sid == '' or not (lease_ms and lease_ms >= 1 and lease_ms <= 9007199254740991
    and lease_ms % 1 == 0) or not token or token == '' then
  return redis.error_reply('CS_BADARG claim: malformed arguments')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function claimed(deadline)
  local m = redis.call('HMGET', meta, 'attempts', 'epoch', 'queued_at', 'token_limit')
  return {1, tonumber(m[1]) or 0, tonumber(m[2]) or 0, deadline, tonumber(m[3]) or now,
    tonumber(m[4]) or 0}
end
if redis.call('HGET', meta, 'lease') == token then  -- this call, retried: its claim
  local held = tonumber(redis.call('ZSCORE', running, sid))
  if held then
    return claimed(held)
  end
end
local due = tonumber(redis.call('ZSCORE', queue, sid))
if not due or due > now then
  return {0}
end
if redis.call('EXISTS', meta) == 0 then
  redis.call('ZREM', queue, sid)
  return {-1}
end
local deadline = now + lease_ms
redis.call('ZREM', queue, sid)
redis.call('ZADD', running, deadline, sid)
redis.call('HSET', meta, 'state', 'running', 'lease', token, 'lease_deadline', deadline,
  'claimed_at', now)
return claimed(deadline)
