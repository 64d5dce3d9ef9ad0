#!lua flags=allow-oom
--[[
  Remove a session's newest record and return it (the OpenAI Agents adapter's pop_item):
  drop it from the list, forget its id (id hash and id log, so it may be appended again),
  lower the token and message totals by it, and the head count if it was in the head (a system
  message, or the summary with nothing after it); updated_at is the server's clock (TIME);
  refreshes the session's TTL, as every write does. One atomic call: no append, compaction
  swap or other pop can land in between.
  Retries: a pop keeps its token (ARGV[2], random per pop_item call and the same in its
  retries) and the record it popped in the remembered-pop hash (KEYS[6]) for ARGV[3] ms. A call
  whose token is kept there is a retry of that pop (its reply was lost): it returns the same
  record and pops nothing, also if the session changed in between (appends, other pops, a
  compaction): that record is what the call popped, and popping again would lose the next
  one, which no caller would receive. Only the session's last pop is kept (each pop replaces
  it): a retry that arrives after another client's pop of the same session is not recognised
  and pops again. A call that popped nothing (nil, or an error) keeps nothing: its retry pops
  what is there then, and returns it, so nothing is lost. delete_session removes the hash, and
  create_session removes one left by an expired session.
  Flags: allow-oom: it runs when Redis memory is full (a pop frees its record, keeps about as
  many bytes for its retries (see Memory), and writes a few small fields). Without flags (Redis 6.2) Redis refuses only a script's first
  write that may grow memory, so its first write frees (LTRIM; DEL for a 0.1 id set); the
  remembered record is written after the LTRIM, so it is never the first write.
  Memory: keeping the record for its retries is net neutral: the LTRIM frees the record's
  bytes from the list and the remembered-pop hash takes as many back, plus the token and the
  key (a few hundred bytes: 160-340 measured on Redis 7.0), for ARGV[3] ms (about a minute)
  after the session's last pop, and one record per session at most; then it expires (its
  PEXPIRE is its own window, not the session's TTL, which no write refreshes).
  The compaction state is left as it is: a queued or running session stays so even when the
  pop takes it under its limit (the daemon plans from the totals it reads when it claims it,
  and gives back a session that fits its target), and an idle one is flagged again by the
  next append that passes its limit, as always.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids      id -> record digest
    KEYS[4] message-id log   <prefix>:{<shard>}:s:<sid>:idlog    the ids, oldest first
    KEYS[5] archive list     <prefix>:{<shard>}:s:<sid>:archive  (only its expiry is touched)
    KEYS[6] remembered pop   <prefix>:{<shard>}:s:<sid>:popped   {token = <pop token>,
                                                                  record = <popped JSON>}
    ARGV[1] session id (for error messages)
    ARGV[2] pop token (random, one per pop_item call; the same in its retries)
    ARGV[3] how long the popped record is remembered (ms, an integer in 1..2^53-1)
  Output:
    the popped record (its JSON, as stored), or nil: the session is empty or does not exist;
      a retry of a pop (ARGV[2] kept in KEYS[6]) returns the record that pop removed
    error "CS_CORRUPT ..."    some of the session's keys are missing (evicted): its meta says
                              it holds messages but its list or id hash is gone, or its meta
                              is gone but its messages survive
    error "CS_BADRECORD ..."  the newest record is not a JSON object with an integer "tokens"
                              in 0..2^53-1 (not written by convstate): nothing popped
    error "CS_BADARG ..."     malformed KEYS or ARGV (only a caller bypassing the client sees
                              this)
  A rejected call writes nothing.
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids, idlog, archive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local popped = KEYS[6]
local sid, token, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- (NaN fails every comparison, so it fails the window check.)
if #KEYS ~= 6 or #ARGV ~= 3 or sid == '' or token == ''
    or not (window and window >= 1 and window <= MAX and window % 1 == 0) then
  return redis.error_reply('CS_BADARG pop: malformed arguments')
end

local last = redis.call('HMGET', popped, 'token', 'record')
if last[1] == token and last[2] then
  return last[2]  -- a retry: this call already popped that record (see the header)
end

local m = redis.call('HMGET', meta, 'token_limit', 'message_count', 'head_count', 'ttl',
  'appended', 'token_count', 'ids_popped')
if not m[1] then
  -- Messages without meta: the meta hash was evicted (a session never loses it otherwise).
  -- Keys about to expire (< 1 s) are leftovers of a TTL: the session is gone.
  local left = redis.call('PTTL', msgs)
  if left == -1 or left > 1000 then
    return redis.error_reply('CS_CORRUPT session ' .. sid .. ': its meta hash ' .. meta ..
      ' is missing but its messages survive in ' .. msgs .. ' (evicted? use maxmemory-policy' ..
      ' noeviction); delete the session or restore it')
  end
  return nil
end
local message_count = tonumber(m[2]) or 0
if message_count <= 0 then
  return nil
end
-- Meta says messages are stored: a missing list or id hash was evicted. Popping would answer
-- from what is left, or leave the popped id behind. (The id hash exists once a message was
-- appended or created with an id: meta appended > 0, until pops forget every id in it: meta
-- ids_popped, which the next append that stores an id clears.)
local needed = {msgs}
if (tonumber(m[5]) or 0) > 0 and not m[7] then needed[2] = ids end
for _, key in ipairs(needed) do
  if redis.call('EXISTS', key) == 0 then
    return redis.error_reply('CS_CORRUPT session ' .. sid .. ': ' .. key .. ' is missing' ..
      ' although its meta counts ' .. message_count .. ' messages (evicted? use' ..
      ' maxmemory-policy noeviction); delete the session or restore it')
  end
end

local raw = redis.call('LRANGE', msgs, -1, -1)[1]
local ok, record = false, nil
if string.sub(raw, 1, 1) == '{' then  -- an object (cjson reads [] as a table too)
  ok, record = pcall(cjson.decode, raw)
end
local tokens = ok and type(record) == 'table' and record.tokens
if tokens == nil then tokens = 0 end  -- (a record without "tokens" counted for nothing)
if not ok or type(record) ~= 'table' or type(tokens) ~= 'number'
    or not (tokens >= 0 and tokens <= MAX and tokens % 1 == 0) then
  return redis.error_reply('CS_BADRECORD session ' .. sid .. ': its newest record is not a' ..
    ' convstate record (a JSON object with an integer "tokens"); nothing was popped')
end
local id = record.id
if type(id) ~= 'string' or id == '' then id = nil end
local head_count = tonumber(m[3]) or 0
local ttl = tonumber(m[4]) or 0
local token_count = tonumber(m[6]) or 0

if id and type(redis.pcall('HGET', ids, id)) == 'table' then
  -- WRONGTYPE: convstate 0.1 kept the ids in a SET. Take them over into the hash and the log,
  -- as append.lua does (DEL first: never refused at maxmemory).
  local old = redis.call('SMEMBERS', ids)
  redis.call('DEL', ids)
  for _, old_id in ipairs(old) do
    redis.call('HSET', ids, old_id, '')
    redis.call('RPUSH', idlog, old_id)
  end
end
-- The first write (this, or the DEL above) never grows memory (see the header).
redis.call('LTRIM', msgs, 0, -2)
-- Remembered for the call's retries; written after the LTRIM, which freed as many bytes.
redis.call('HSET', popped, 'token', token, 'record', raw)
redis.call('PEXPIRE', popped, window)
if id then
  redis.call('HDEL', ids, id)
  redis.call('LREM', idlog, -1, id)  -- near the tail
end
if head_count >= message_count then  -- the popped record was in the head
  head_count = math.max(0, head_count - 1)
end
local t = redis.call('TIME')
-- The totals as read above, less the record (one HSET, computed here: it cannot fail halfway,
-- as HINCRBY of a field that is not an integer would).
redis.call('HSET', meta, 'token_count', token_count - tokens, 'message_count', message_count - 1,
  'head_count', head_count, 'updated_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if message_count > 1 and redis.call('EXISTS', ids) == 0 then
  -- Pops forgot every id the window kept (more pops in a row than the id window): the id hash
  -- is gone with messages left, which is no eviction. Say so, for the checks above and in
  -- append.lua (and convstate verify).
  redis.call('HSET', meta, 'ids_popped', 1)
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
return raw
