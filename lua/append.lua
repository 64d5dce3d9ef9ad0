--[[
  Append one message or a batch to a session; keep exact token and message totals; flag the
  session for compaction when it passes its token limit while idle (and, after a compaction that
  could not shrink it, once it grows past meta reflag_above). O(batch), never O(history).
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id set   <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] shard queue      <prefix>:{<shard>}:q
    ARGV[1] now (ms)
    ARGV[2] session id (the queue member)
    ARGV[3] wake-up channel
    ARGV[4] create the session if missing: "1" or "0"
    ARGV[5] token limit (>= 1), used only when the session is created here
    ARGV[6] TTL (ms, 0 = none), used only when the session is created here
    ARGV[7] maximum messages per session (0 = unlimited)
    ARGV[8] n, the number of messages; then for each message i (0-based), at 9 + 4i:
            id, tokens, is-system ("1"/"0"), message JSON
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    {token_count, message_count, flagged (0/1), stored, state}
      stored < n when ids were already stored (a retried append) or repeated in the batch
    error "CS_NOSESSION ..."  the session does not exist and ARGV[4] is "0"
    error "CS_FULL ... (max_messages)"  storing the new messages would pass ARGV[7]
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this), or
                              a token total that would pass MAX
  A rejected call writes nothing.
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local sid, channel = ARGV[2], ARGV[3]
local max_messages = tonumber(ARGV[7])
local n = tonumber(ARGV[8])

-- Validate every argument before the first write: a rejected call changes nothing. Each
-- number check is written so that NaN (false in every comparison) fails it.
if not (now and now >= 0 and now <= MAX and now % 1 == 0)
    or not (max_messages and max_messages >= 0 and max_messages <= MAX and max_messages % 1 == 0)
    or not (n and n >= 1 and n % 1 == 0) or #ARGV ~= 8 + 4 * n or sid == '' then
  return redis.error_reply('CS_BADARG append: malformed header arguments')
end
local batch = {}
local batch_tokens = 0
for i = 0, n - 1 do
  local base = 9 + 4 * i
  local id, tokens, is_system, body = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  if id == '' or not (tokens and tokens >= 0 and tokens <= MAX and tokens % 1 == 0)
      or (is_system ~= '0' and is_system ~= '1') or string.sub(body, 1, 1) ~= '{' then
    return redis.error_reply('CS_BADARG append: malformed message ' .. (i + 1))
  end
  batch_tokens = batch_tokens + tokens
  batch[i + 1] = {id, tokens, is_system == '1', body}
end

local m = redis.call('HMGET', meta, 'token_limit', 'token_count', 'message_count', 'head_count',
  'state', 'ttl', 'reflag_above', 'appended')
local limit = tonumber(m[1])
if (tonumber(m[2]) or 0) + batch_tokens > MAX then
  return redis.error_reply('CS_BADARG append: the token total would pass 2^53 - 1')
end
local created = false
if not limit then
  if ARGV[4] ~= '1' then
    return redis.error_reply('CS_NOSESSION session ' .. sid .. ' does not exist')
  end
  limit = tonumber(ARGV[5])
  local ttl = tonumber(ARGV[6])
  if not (limit and limit >= 1 and limit <= MAX and limit % 1 == 0)
      or not (ttl and ttl >= 0 and ttl <= MAX and ttl % 1 == 0) then
    return redis.error_reply('CS_BADARG append: malformed create arguments')
  end
  -- Leftovers of an expired session (its keys expire one by one) must not leak into this one.
  redis.call('DEL', msgs, ids)
  m = {limit, 0, 0, 0, 'idle', ttl, 0, 0}
  created = true
end
local token_count, message_count = tonumber(m[2]), tonumber(m[3])
local head_count, state, ttl = tonumber(m[4]), m[5], tonumber(m[6]) or 0
-- After a compaction that could not shrink the session, wait for it to grow before re-flagging.
local reflag_above, appended = tonumber(m[7]) or 0, tonumber(m[8]) or 0

-- SADD is the duplicate check: 0 means the id is stored (a retry of a timed-out call) or was
-- repeated earlier in this batch. If the batch would overfill the session, the ids are taken
-- back before anything else is written.
local fresh = {}
for _, msg in ipairs(batch) do
  if redis.call('SADD', ids, msg[1]) == 1 then
    fresh[#fresh + 1] = msg
  end
end
if max_messages > 0 and message_count + #fresh > max_messages then
  for _, msg in ipairs(fresh) do
    redis.call('SREM', ids, msg[1])
  end
  return redis.error_reply(string.format(
    'CS_FULL session %s holds %d messages; the maximum is %d (max_messages)',
    sid, message_count, max_messages))
end

for _, msg in ipairs(fresh) do
  redis.call('RPUSH', msgs, msg[4])
  if msg[3] and head_count == message_count then
    head_count = head_count + 1  -- leading system messages form the head that reads keep
  end
  token_count = token_count + msg[2]
  message_count = message_count + 1
end

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
if ttl > 0 then
  redis.call('PEXPIRE', msgs, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', ids, ttl)
end
return {token_count, message_count, flagged, #fresh, state}
