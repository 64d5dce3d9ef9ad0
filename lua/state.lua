--[[
  Read a session's whole state: meta and every stored message.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    ARGV[1] session id (for error messages)
    ARGV[2] "1" = include the messages, "0" = meta only
  Output:
    {meta (flat HGETALL), messages (oldest first; empty when ARGV[2] is "0")}
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this)
]]
if ARGV[2] ~= '0' and ARGV[2] ~= '1' then
  return redis.error_reply('CS_BADARG state: malformed arguments')
end
local flat = redis.call('HGETALL', KEYS[2])
if #flat == 0 then
  return redis.error_reply('CS_NOSESSION session ' .. ARGV[1] .. ' does not exist')
end
if ARGV[2] == '0' then
  return {flat, {}}
end
return {flat, redis.call('LRANGE', KEYS[1], 0, -1)}
