--[[
  Swap a compaction in: verify the lease token and that the history's prefix is exactly the
  snapshot's, then replace that prefix with the system message(s) + the new summary, adjust the
  totals, bump the epoch, release the lease and queue the session again if it is still over
  its limit. Atomic (one script), so no append can land between the check and the writes;
  appends only push to the tail, which the swap never touches: nothing appended is lost.
  Memory full (maxmemory, noeviction): this script declares no flags on purpose. Redis then
  refuses only its first write that may grow memory (and runs the rest once it has written).
  A swap that frees at least as many bytes as it adds writes LTRIM first (never refused), so it
  runs when memory is full; one that grows the data (an archive, a summary longer than what it
  folds) writes HSET first, so Redis refuses it then with an OOM error, having written
  nothing. The same holds on Redis 6.2, 7 and Valkey.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] shard queue      <prefix>:{<shard>}:q
    KEYS[5] shard running    <prefix>:{<shard>}:run
    KEYS[6] archive list     <prefix>:{<shard>}:s:<sid>:archive
    KEYS[7] message-id log   <prefix>:{<shard>}:s:<sid>:idlog
    ARGV[1] session id
    ARGV[2] lease token
    ARGV[3] p, the length of the prefix to replace (>= 1)
    ARGV[4] tokens of that prefix
    ARGV[5] h, the number of new head records (system message(s) + summary, >= 1)
    ARGV[6] tokens of the new head
    ARGV[7] a, archive the last a records of the prefix (0 = no archive)
    ARGV[8] archive TTL (s): keep the archive at least this long, and never less than the
            session's TTL (0: the session's TTL, or none)
    ARGV[9] one step of a longer fold: the policy's target ratio (0 < r <= 1), and the session
            is queued again while over r * its limit; 0 = a whole fold (queued again only
            while over its limit)
    ARGV[10] the summary's message id
    ARGV[11 .. 10+h]       the new head records (JSON), in order
    ARGV[11+h .. 10+h+p]   the ids the prefix must hold, in order
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    {"compacted", new token count, queued again (0/1)}
    {"lost"}     the lease token is not the caller's: nothing written
                 (a retry of a swap that committed, known by meta.last_summary = ARGV[10],
                 answers "compacted" with the session's current total and queued state)
    {"changed"}  the prefix is not the snapshot's (a delete or an outside rewrite)
    error "CS_BADARG ..."  malformed ARGV
    error "OOM ..."        (Redis) memory is full and this swap would grow the data
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids, queue, running, archive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local idlog = KEYS[7]
local sid, token = ARGV[1], ARGV[2]
local p, old_tokens, h = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local head_tokens, a, archive_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ratio = tonumber(ARGV[9])
local function int(x, low)
  return x and x >= low and x <= MAX and x % 1 == 0
end
if #KEYS ~= 7 or not sid or sid == '' or not token or token == '' or not int(p, 1) or not int(old_tokens, 0)
    or not int(h, 1) or not int(head_tokens, 0) or not int(a, 0) or a > p
    or not int(archive_ttl, 0) or not (ratio and ratio >= 0 and ratio <= 1) or not ARGV[10]
    or #ARGV ~= 10 + h + p then
  return redis.error_reply('CS_BADARG swap: malformed arguments')
end

local held = redis.call('HMGET', meta, 'lease', 'last_summary', 'token_count', 'state')
if held[1] ~= token then
  -- A retry of this very swap (its reply was lost, e.g. to a timeout while the server ran
  -- it; the swap released the lease): report the compaction it made, not a lost lease.
  if held[2] == ARGV[10] then
    return {'compacted', tonumber(held[3]) or 0, held[4] == 'queued' and 1 or 0}
  end
  return {'lost'}
end
local prefix = redis.call('LRANGE', msgs, 0, p - 1)
if #prefix ~= p then
  return {'changed'}
end
local freed = 0
for i = 1, p do
  local ok, record = pcall(cjson.decode, prefix[i])
  if not ok or type(record) ~= 'table' or record.id ~= ARGV[10 + h + i] then
    return {'changed'}
  end
  freed = freed + #prefix[i]
end
local added = #ARGV[10]
for i = 1, h do
  added = added + #ARGV[10 + i]
end
for i = p - a + 1, p do
  added = added + #prefix[i]
end

local m = redis.call('HMGET', meta, 'token_count', 'message_count', 'token_limit', 'ttl')
local token_count = (tonumber(m[1]) or 0) - old_tokens + head_tokens
local message_count = (tonumber(m[2]) or 0) - p + h
local limit = tonumber(m[3]) or 0
-- Still over the limit, or one step of a longer fold short of the target: queue again.
local over = token_count > limit or (ratio > 0 and token_count > math.floor(ratio * limit))
local ttl = tonumber(m[4]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The first write decides whether a full memory refuses the swap (see the header).
if added > freed then
  redis.call('HSET', meta, 'compacted_at', now)
end
redis.call('LTRIM', msgs, p, -1)
for i = h, 1, -1 do
  redis.call('LPUSH', msgs, ARGV[10 + i])
end
-- The summary's id is taken (no digest: any message sent with it conflicts). A session last
-- appended to by convstate 0.1 still has an id SET (WRONGTYPE here): the summary's random id
-- is left out of it, and append.lua takes the set over into the hash at the next append. An
-- id hash or log evicted without the other is left missing: a new one holding the summary's
-- id alone would hide the loss from append.lua, which reports it (and a new log would never
-- prune the hash's older ids).
if redis.call('EXISTS', ids) == redis.call('EXISTS', idlog) then
  if type(redis.pcall('HSET', ids, ARGV[10], 'summary')) == 'number' then
    redis.call('RPUSH', idlog, ARGV[10])
  end
end
redis.call('HSET', meta, 'token_count', token_count, 'message_count', message_count,
  'head_count', h, 'state', over and 'queued' or 'idle', 'attempts', 0, 'updated_at', now,
  'compacted_at', now, 'last_summary', ARGV[10])
if over then
  redis.call('HSET', meta, 'queued_at', now)
end
redis.call('HINCRBY', meta, 'epoch', 1)
redis.call('HDEL', meta, 'lease', 'lease_deadline', 'last_error', 'reflag_above', 'force')
redis.call('ZREM', running, sid)
if over then
  redis.call('ZADD', queue, now, sid)
end
if a > 0 then
  for i = p - a + 1, p do
    redis.call('RPUSH', archive, prefix[i])
  end
  -- At least as long as the session (whose every write extends it too), or longer.
  local archive_ms = math.max(ttl, archive_ttl * 1000)
  if archive_ms > 0 then
    redis.call('PEXPIRE', archive, archive_ms)
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', msgs, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', ids, ttl)
  redis.call('PEXPIRE', idlog, ttl)
end
return {'compacted', token_count, over and 1 or 0}
