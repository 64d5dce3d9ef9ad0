--[[
  Set or remove fields of a session's context (an app's own per-session data); updated_at is
  the server's clock (TIME); refreshes the session's TTL, as every write does.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] message-id log   <prefix>:{<shard>}:s:<sid>:idlog
    KEYS[5] archive list     <prefix>:{<shard>}:s:<sid>:archive
    ARGV[1] session id (for error messages)
    ARGV[2] "1" = replace the whole context, "0" = merge into it
    then pairs of field, JSON value; an empty value removes the field
  Output:
    number of context fields after the update
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this)
    error "OOM ..."           (Redis) memory is full: refused before any write
]]
local msgs, meta, ids, idlog, archive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if not ARGV[1] or (ARGV[2] ~= '0' and ARGV[2] ~= '1') or (#ARGV - 2) % 2 ~= 0 then
  return redis.error_reply('CS_BADARG update_context: malformed arguments')
end
for i = 3, #ARGV, 2 do
  if ARGV[i] == '' then
    return redis.error_reply('CS_BADARG update_context: empty context field')
  end
end
local flat = redis.call('HGETALL', meta)
if #flat == 0 then
  return redis.error_reply('CS_NOSESSION session ' .. ARGV[1] .. ' does not exist')
end
-- The first write may grow memory, so a full server (maxmemory) refuses the call before
-- any write (Redis refuses a script's first such write only).
local t = redis.call('TIME')
redis.call('HSET', meta, 'updated_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local fields = 0
local ttl = 0
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 4) == 'ctx:' then
    if ARGV[2] == '1' then
      redis.call('HDEL', meta, flat[i])
    else
      fields = fields + 1
    end
  elseif flat[i] == 'ttl' then
    ttl = tonumber(flat[i + 1]) or 0
  end
end
for i = 3, #ARGV, 2 do
  local field = 'ctx:' .. ARGV[i]
  local had = redis.call('HEXISTS', meta, field)
  if ARGV[i + 1] == '' then
    fields = fields - redis.call('HDEL', meta, field)
  else
    redis.call('HSET', meta, field, ARGV[i + 1])
    fields = fields + 1 - had
  end
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
return fields
