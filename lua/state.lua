--[[
  Read a session's whole state: meta and every stored message (and its archive).
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] archive list     <prefix>:{<shard>}:s:<sid>:archive  (only with ARGV[2] = "2")
    ARGV[1] session id (for error messages)
    ARGV[2] "1" = include the messages, "0" = meta only, "2" = messages and archive
  Output:
    {meta (flat HGETALL), messages (oldest first; empty when ARGV[2] is "0")}
    {meta, messages, archive (oldest first)}  when ARGV[2] is "2"
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_CORRUPT ..."    its meta counts messages but its list is missing, or its meta is
                              missing but its messages survive (evicted)
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this)
]]
if (ARGV[2] ~= '0' and ARGV[2] ~= '1' and ARGV[2] ~= '2') or (ARGV[2] == '2' and #KEYS < 3) then
  return redis.error_reply('CS_BADARG state: malformed arguments')
end
local flat = redis.call('HGETALL', KEYS[2])
if #flat == 0 then
  -- Messages without meta: the meta hash was evicted (a session never loses it otherwise).
  -- Keys about to expire (< 1 s) are leftovers of a TTL: the session is gone.
  local left = redis.call('PTTL', KEYS[1])
  if left == -1 or left > 1000 then
    return redis.error_reply('CS_CORRUPT session ' .. ARGV[1] .. ': its meta hash ' .. KEYS[2] ..
      ' is missing but its messages survive in ' .. KEYS[1] .. ' (evicted? use' ..
      ' maxmemory-policy noeviction); delete the session or restore it')
  end
  return redis.error_reply('CS_NOSESSION session ' .. ARGV[1] .. ' does not exist')
end
local raw = {}
if ARGV[2] ~= '0' then
  raw = redis.call('LRANGE', KEYS[1], 0, -1)
end
if #raw == 0 then
  for i = 1, #flat, 2 do
    if flat[i] == 'message_count' and (tonumber(flat[i + 1]) or 0) > 0
        and redis.call('EXISTS', KEYS[1]) == 0 then
      return redis.error_reply('CS_CORRUPT session ' .. ARGV[1] .. ': ' .. KEYS[1] ..
        ' is missing although its meta counts ' .. flat[i + 1] .. ' messages (evicted? use' ..
        ' maxmemory-policy noeviction); delete the session or restore it')
    end
  end
end
if ARGV[2] == '2' then
  return {flat, raw, redis.call('LRANGE', KEYS[3], 0, -1)}
end
return {flat, raw}
