--[[
  Create a session, optionally with its system message(s) and initial context. created_at and
  updated_at are the server's clock (TIME). A retry of a call that created the session (its
  reply was lost) is recognised by the creation token kept in meta, and answers created 1.
  Leftovers of an expired session with the same id (its id hash, id log, archive or
  remembered pop) are deleted: a new session starts clean.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] message-id log   <prefix>:{<shard>}:s:<sid>:idlog
    KEYS[5] archive list     <prefix>:{<shard>}:s:<sid>:archive
    KEYS[6] remembered pop   <prefix>:{<shard>}:s:<sid>:popped   (see pop.lua)
    ARGV[1] creation token (random, one per create_session call; the same in its retries)
    ARGV[2] session id
    ARGV[3] token limit (positive integer)
    ARGV[4] TTL (ms, 0 = none)
    ARGV[5] if the session exists: "1" = leave it and return created 0, "0" = error
    ARGV[6] n, the number of system messages; then for each message i (0-based), at 7 + 4i:
            id, tokens, message JSON, digest (see append.lua)
    then pairs of context field, JSON value (the initial context; an empty value sets no field)
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    {created (1/0), meta (flat HGETALL), messages}
      created 1: created by this call, or by an earlier attempt of it (same token)
      created 0: the session existed (ARGV[5] "1"); meta and messages are its current ones
    error "CS_EXISTS ..."  the session exists (created by another call) and ARGV[5] is "0"
    error "CS_CORRUPT ..." its meta is missing but its messages survive (evicted): nothing is
                           deleted (delete_session does that)
    error "CS_BADARG ..."  malformed KEYS or ARGV (only a caller bypassing the client sees
                           this), or system messages of more than MAX tokens
    error "OOM ..."        (Redis) memory is full: refused before any write
  A rejected call writes nothing.
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids, idlog, archive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local popped = KEYS[6]
local token, sid = ARGV[1], ARGV[2]
local limit, ttl, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
-- Each number check is written so that NaN (false in every comparison) fails it.
if #KEYS ~= 6 or not token or token == '' or not sid or sid == ''
    or not (limit and limit >= 1 and limit <= MAX and limit % 1 == 0)
    or not (ttl and ttl >= 0 and ttl <= MAX and ttl % 1 == 0)
    or not (n and n >= 0 and n <= MAX and n % 1 == 0) or (ARGV[5] ~= '0' and ARGV[5] ~= '1') then
  return redis.error_reply('CS_BADARG create: malformed header arguments')
end
local ctx_start = 7 + 4 * n
if #ARGV < ctx_start - 1 or (#ARGV - ctx_start + 1) % 2 ~= 0 then
  return redis.error_reply('CS_BADARG create: wrong number of arguments')
end
local token_count = 0
for i = 0, n - 1 do
  local base = 7 + 4 * i
  local tokens = tonumber(ARGV[base + 1])
  if ARGV[base] == '' or not (tokens and tokens >= 0 and tokens <= MAX and tokens % 1 == 0)
      or string.sub(ARGV[base + 2], 1, 1) ~= '{' or ARGV[base + 3] == '' then
    return redis.error_reply('CS_BADARG create: malformed message ' .. (i + 1))
  end
  token_count = token_count + tokens
end
if token_count > MAX then
  return redis.error_reply('CS_BADARG create: the token total would pass 2^53 - 1')
end
for i = ctx_start, #ARGV, 2 do
  if ARGV[i] == '' then
    return redis.error_reply('CS_BADARG create: empty context field')
  end
end

local owner = redis.call('HGET', meta, 'create_token')
if owner == token then
  return {1, redis.call('HGETALL', meta), redis.call('LRANGE', msgs, 0, -1)}
end
if owner or redis.call('EXISTS', meta) == 1 then
  if ARGV[5] == '1' then
    return {0, redis.call('HGETALL', meta), redis.call('LRANGE', msgs, 0, -1)}
  end
  return redis.error_reply('CS_EXISTS session ' .. sid .. ' already exists')
end
-- Messages without meta: the meta hash was evicted (a session never loses it otherwise), and
-- creating would delete a live conversation's messages. The keys of a session share their
-- deadline, so leftovers of an expired one have at most a moment (< 1 s) to live.
local left = redis.call('PTTL', msgs)
if left == -1 or left > 1000 then
  return redis.error_reply('CS_CORRUPT session ' .. sid .. ': its meta hash ' .. meta ..
    ' is missing but its messages survive in ' .. msgs .. ' (evicted? use maxmemory-policy' ..
    ' noeviction); delete the session or restore it')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The first write may grow memory, so a full server (maxmemory) refuses the call before
-- any write (Redis refuses a script's first such write only).
redis.call('HSET', meta, 'created_at', now, 'updated_at', now, 'token_count', token_count,
  'message_count', n, 'token_limit', limit, 'ttl', ttl, 'head_count', n, 'state', 'idle',
  'epoch', 0, 'appended', n, 'create_token', token)
-- Leftovers of an expired session (keys expire one by one) must not leak into a new one.
redis.call('DEL', msgs, ids, idlog, archive, popped)
for i = 0, n - 1 do
  local base = 7 + 4 * i
  redis.call('HSET', ids, ARGV[base], ARGV[base + 3])
  redis.call('RPUSH', idlog, ARGV[base])
  redis.call('RPUSH', msgs, ARGV[base + 2])
end
for i = ctx_start, #ARGV, 2 do
  if ARGV[i + 1] ~= '' then
    redis.call('HSET', meta, 'ctx:' .. ARGV[i], ARGV[i + 1])
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', meta, ttl)
  if n > 0 then
    redis.call('PEXPIRE', msgs, ttl)
    redis.call('PEXPIRE', ids, ttl)
    redis.call('PEXPIRE', idlog, ttl)
  end
end
return {1, redis.call('HGETALL', meta), redis.call('LRANGE', msgs, 0, -1)}
