--[[
  Delete a session: its keys, and its entries in the shard's compaction queues.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id set   <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] shard queue      <prefix>:{<shard>}:q
    KEYS[5] shard running    <prefix>:{<shard>}:run
    KEYS[6] archive list     <prefix>:{<shard>}:s:<sid>:archive
    KEYS[7] shard dead set   <prefix>:{<shard>}:dead
    ARGV[1] session id (the queue member)
  Output:
    1 if the session existed, 0 if not
    error "CS_BADARG ..."  ARGV[1] missing or empty (nothing deleted)
]]
if not ARGV[1] or ARGV[1] == '' then
  return redis.error_reply('CS_BADARG delete: malformed arguments')
end
local existed = redis.call('EXISTS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
return existed
