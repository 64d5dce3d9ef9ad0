--[[
  Append one message or a batch to a session; keep exact token and message totals; flag the
  session for compaction when it passes its token limit while idle (and, after a compaction that
  could not shrink it, once it grows past meta reflag_above). O(batch), never O(history).
  Every time it writes (queue score, created_at, updated_at, queued_at) is the server's clock
  (TIME), never the caller's: a skewed app host cannot delay or advance compaction.
  Idempotency: the id hash maps the ids of the session's last ARGV[1] appended messages (and
  of the whole current batch) to their record digests; the id log holds the same ids in append
  order, and each append prunes the ids it pushes out of the window.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids      id -> record digest
    KEYS[4] shard queue      <prefix>:{<shard>}:q
    KEYS[5] message-id log   <prefix>:{<shard>}:s:<sid>:idlog    the ids, oldest first
    KEYS[6] archive list     <prefix>:{<shard>}:s:<sid>:archive  (only its expiry is touched)
    ARGV[1] id window: how many appended ids the id hash keeps (an integer in 1..2^53-1)
    ARGV[2] session id (the queue member)
    ARGV[3] wake-up channel
    ARGV[4] create the session if missing: "1" or "0"
    ARGV[5] token limit (>= 1), used only when the session is created here
    ARGV[6] TTL (ms, 0 = none), used only when the session is created here
    ARGV[7] maximum messages per session (0 = unlimited)
    ARGV[8] n, the number of messages; then for each message i (0-based), at 9 + 5i:
            id, tokens, is-system ("1"/"0"), message JSON, digest (non-empty; the same for
            every send of the same message)
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    {token_count, message_count, flagged (0/1), stored, state}
      stored < n when ids were already stored with the same digest (a retried append) or
      repeated in the batch
    error "CS_IDCONFLICT ..." an id is stored (or earlier in the batch) with another digest: a
                              different message reuses it
    error "CS_NOSESSION ..."  the session does not exist and ARGV[4] is "0"
    error "CS_FULL ... (max_messages)"  storing the new messages would pass ARGV[7]
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this), or
                              a token total that would pass MAX
    error "CS_CORRUPT ..."    some of the session's keys are missing (evicted): its meta says
                              it holds messages but its list or id hash is gone, its id hash
                              survives its id log, or its meta is gone but its messages
                              survive (with more than a second to live)
    error "OOM ..."           (Redis) memory is full: the first write is one that may grow
                              memory, so a full server refuses the call before any write
  A rejected call writes nothing.
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids, queue, idlog, archive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local window = tonumber(ARGV[1])
local sid, channel = ARGV[2], ARGV[3]
local max_messages = tonumber(ARGV[7])
local n = tonumber(ARGV[8])

-- Validate every argument before the first write: a rejected call changes nothing. Each
-- number check is written so that NaN (false in every comparison) fails it.
if not (window and window >= 1 and window <= MAX and window % 1 == 0)
    or not (max_messages and max_messages >= 0 and max_messages <= MAX and max_messages % 1 == 0)
    or not (n and n >= 1 and n % 1 == 0) or #ARGV ~= 8 + 5 * n or sid == '' then
  return redis.error_reply('CS_BADARG append: malformed header arguments')
end
local batch = {}
local batch_tokens = 0
for i = 0, n - 1 do
  local base = 9 + 5 * i
  local id, tokens, is_system, body = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  local digest = ARGV[base + 4]
  if id == '' or not (tokens and tokens >= 0 and tokens <= MAX and tokens % 1 == 0)
      or (is_system ~= '0' and is_system ~= '1') or string.sub(body, 1, 1) ~= '{'
      or digest == '' then
    return redis.error_reply('CS_BADARG append: malformed message ' .. (i + 1))
  end
  batch_tokens = batch_tokens + tokens
  batch[i + 1] = {id, tokens, is_system == '1', body, digest}
end

local m = redis.call('HMGET', meta, 'token_limit', 'token_count', 'message_count', 'head_count',
  'state', 'ttl', 'reflag_above', 'appended', 'ids_popped')
local limit = tonumber(m[1])
if (tonumber(m[2]) or 0) + batch_tokens > MAX then
  return redis.error_reply('CS_BADARG append: the token total would pass 2^53 - 1')
end
local created = false
if not limit then
  local ttl = tonumber(ARGV[6])
  if ARGV[4] == '1' then
    limit = tonumber(ARGV[5])
    if not (limit and limit >= 1 and limit <= MAX and limit % 1 == 0)
        or not (ttl and ttl >= 0 and ttl <= MAX and ttl % 1 == 0) then
      return redis.error_reply('CS_BADARG append: malformed create arguments')
    end
  end
  -- Messages without meta: the meta hash was evicted (a session never loses it otherwise).
  -- The session is not missing, and creating here would delete them. Keys about to expire
  -- (< 1 s) are leftovers of a TTL: the session is gone.
  local left = redis.call('PTTL', msgs)
  if left == -1 or left > 1000 then
    return redis.error_reply('CS_CORRUPT session ' .. sid .. ': its meta hash ' .. meta ..
      ' is missing but its messages survive in ' .. msgs .. ' (evicted? use maxmemory-policy' ..
      ' noeviction); delete the session or restore it')
  end
  if ARGV[4] ~= '1' then
    return redis.error_reply('CS_NOSESSION session ' .. sid .. ' does not exist')
  end
  m = {limit, 0, 0, 0, 'idle', ttl, 0, 0}
  created = true
end
local token_count, message_count = tonumber(m[2]), tonumber(m[3])
if not created and message_count > 0 then
  -- Meta says messages are stored: a missing list or id hash was evicted. Appending would
  -- answer a phantom total, or store a retried message twice. (The id hash exists once a
  -- message was appended or created with an id: meta appended > 0, until pops forget every
  -- id in it: meta ids_popped, cleared below.)
  local needed = {msgs}
  if (tonumber(m[8]) or 0) > 0 and not m[9] then needed[2] = ids end
  for _, key in ipairs(needed) do
    if redis.call('EXISTS', key) == 0 then
      return redis.error_reply('CS_CORRUPT session ' .. sid .. ': ' .. key .. ' is missing' ..
        ' although its meta counts ' .. message_count .. ' messages (evicted? use' ..
        ' maxmemory-policy noeviction); delete the session or restore it')
    end
  end
end
local head_count, state, ttl = tonumber(m[4]), m[5], tonumber(m[6]) or 0
-- After a compaction that could not shrink the session, wait for it to grow before re-flagging.
local reflag_above, appended = tonumber(m[7]) or 0, tonumber(m[8]) or 0

-- The duplicate check: an id stored with the same digest is a retry of a timed-out call (or a
-- repeat within this batch) and is dropped; with another digest a different message reuses
-- the id, and the whole call is refused. A new session (leftovers of an expired one are
-- deleted below) has no stored ids. Nothing is written before every check passed.
if not created and type(redis.pcall('HGET', ids, batch[1][1])) == 'table' then
  -- WRONGTYPE: convstate 0.1 kept the ids in a SET. Take them over into the hash (digest
  -- unknown: '' matches any message, so such an id stays a plain retry) and the log, once per
  -- session. It changes no answer, so it is done before the checks.
  local old = redis.call('SMEMBERS', ids)
  redis.call('DEL', ids)
  for _, id in ipairs(old) do
    redis.call('HSET', ids, id, '')
    redis.call('RPUSH', idlog, id)
  end
end
-- The id log holds the ids of the id hash (it bounds it: the window prunes what it pushes
-- out), so a hash without its log lost the log to eviction: appending would grow the hash
-- forever. (A 0.1 id set has no log: it was taken over into both just above.)
if not created and redis.call('EXISTS', idlog) == 0 and redis.call('EXISTS', ids) == 1 then
  return redis.error_reply('CS_CORRUPT session ' .. sid .. ': its id log ' .. idlog ..
    ' is missing but its id hash ' .. ids .. ' survives (evicted? use maxmemory-policy' ..
    ' noeviction); delete the session or restore it')
end
local fresh, seen = {}, {}
for i, msg in ipairs(batch) do
  local stored = seen[msg[1]]
  if not stored and not created then
    stored = redis.call('HGET', ids, msg[1])
  end
  if stored and stored ~= '' and stored ~= msg[5] then
    return redis.error_reply(string.format(
      'CS_IDCONFLICT session %s: message %d reuses the id %s of a different message',
      sid, i, msg[1]))
  end
  if not stored then
    fresh[#fresh + 1] = msg
    seen[msg[1]] = msg[5]
  end
end
if max_messages > 0 and message_count + #fresh > max_messages then
  return redis.error_reply(string.format(
    'CS_FULL session %s holds %d messages; the maximum is %d (max_messages)',
    sid, message_count, max_messages))
end

if created then
  -- The first write may grow memory, so a full server refuses the call before any write
  -- (Redis refuses a script's first such write only; DEL never is).
  redis.call('HSET', meta, 'token_limit', limit)
  -- Leftovers of an expired session (its keys expire one by one) must not leak into this one.
  redis.call('DEL', msgs, ids, idlog, archive)
end
local logged = 0  -- the id log's length after this call's pushes
for _, msg in ipairs(fresh) do
  redis.call('RPUSH', msgs, msg[4])
  redis.call('HSET', ids, msg[1], msg[5])
  logged = redis.call('RPUSH', idlog, msg[1])
  if msg[3] and head_count == message_count then
    head_count = head_count + 1  -- leading system messages form the head that reads keep
  end
  token_count = token_count + msg[2]
  message_count = message_count + 1
end
-- Bound the id hash: drop the oldest ids beyond the window, never one of this batch. A call
-- drops about as many ids as it pushed, so this stays O(batch).
local excess = logged - math.max(window, #fresh)
while excess > 0 do
  local old = redis.call('LRANGE', idlog, 0, math.min(excess, 1000) - 1)
  redis.call('LTRIM', idlog, #old, -1)
  redis.call('HDEL', ids, unpack(old))
  excess = excess - #old
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local flagged = 0
if token_count > limit and token_count > reflag_above and state == 'idle' then
  redis.call('ZADD', queue, 'NX', now, sid)
  redis.call('PUBLISH', channel, sid)
  state = 'queued'
  flagged = 1
end
if created then
  redis.call('HSET', meta, 'created_at', now, 'updated_at', now, 'token_count', token_count,
    'message_count', message_count, 'token_limit', limit, 'ttl', ttl, 'head_count', head_count,
    'state', state, 'epoch', 0, 'appended', #fresh)
elseif #fresh > 0 then
  redis.call('HSET', meta, 'token_count', token_count, 'message_count', message_count,
    'head_count', head_count, 'updated_at', now, 'appended', appended + #fresh, 'state', state)
end
if flagged == 1 then
  redis.call('HSET', meta, 'queued_at', now)
end
if m[9] and #fresh > 0 then
  redis.call('HDEL', meta, 'ids_popped')  -- the id hash holds ids again
end
if ttl > 0 then
  redis.call('PEXPIRE', msgs, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', ids, ttl)
  redis.call('PEXPIRE', idlog, ttl)
  -- The archive lives at least as long as its session (archive_ttl may keep it longer).
  local left = redis.call('PTTL', archive)
  if left >= 0 and left < ttl then
    redis.call('PEXPIRE', archive, ttl)
  end
end
return {token_count, message_count, flagged, #fresh, state}
