--[[
  Set or remove fields of a session's context (an app's own per-session data).
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id set   <prefix>:{<shard>}:s:<sid>:ids
    ARGV[1] now (ms)
    ARGV[2] session id (for error messages)
    ARGV[3] "1" = replace the whole context, "0" = merge into it
    then pairs of field, JSON value; an empty value removes the field
    now is an integer in 0..2^53-1 (the largest a Lua number holds exactly).
  Output:
    number of context fields after the update
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this)
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta, ids = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
if not (now and now >= 0 and now <= MAX and now % 1 == 0) or not ARGV[2]
    or (ARGV[3] ~= '0' and ARGV[3] ~= '1') or (#ARGV - 3) % 2 ~= 0 then
  return redis.error_reply('CS_BADARG update_context: malformed arguments')
end
for i = 4, #ARGV, 2 do
  if ARGV[i] == '' then
    return redis.error_reply('CS_BADARG update_context: empty context field')
  end
end
local flat = redis.call('HGETALL', meta)
if #flat == 0 then
  return redis.error_reply('CS_NOSESSION session ' .. ARGV[2] .. ' does not exist')
end
local fields = 0
local ttl = 0
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 4) == 'ctx:' then
    if ARGV[3] == '1' then
      redis.call('HDEL', meta, flat[i])
    else
      fields = fields + 1
    end
  elseif flat[i] == 'ttl' then
    ttl = tonumber(flat[i + 1]) or 0
  end
end
for i = 4, #ARGV, 2 do
  local field = 'ctx:' .. ARGV[i]
  local had = redis.call('HEXISTS', meta, field)
  if ARGV[i + 1] == '' then
    fields = fields - redis.call('HDEL', meta, field)
  else
    redis.call('HSET', meta, field, ARGV[i + 1])
    fields = fields + 1 - had
  end
end
redis.call('HSET', meta, 'updated_at', now)
if ttl > 0 then
  redis.call('PEXPIRE', msgs, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', ids, ttl)
end
return fields
