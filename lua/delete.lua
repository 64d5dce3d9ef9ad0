--[[
  Delete a session: its keys (the remembered pop too: a copy of a popped record), and its
  entries in the shard's compaction queues. A delete that removed the session leaves its
  token in a tombstone key for ARGV[3] ms, so that a retry of the same call (its reply was
  lost) answers 1 again and deletes nothing created since.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] message-id hash  <prefix>:{<shard>}:s:<sid>:ids
    KEYS[4] shard queue      <prefix>:{<shard>}:q
    KEYS[5] shard running    <prefix>:{<shard>}:run
    KEYS[6] archive list     <prefix>:{<shard>}:s:<sid>:archive
    KEYS[7] shard dead set   <prefix>:{<shard>}:dead
    KEYS[8] message-id log   <prefix>:{<shard>}:s:<sid>:idlog
    KEYS[9] tombstone hash   <prefix>:{<shard>}:s:<sid>:deleted  {token = <delete token>}
    KEYS[10] remembered pop  <prefix>:{<shard>}:s:<sid>:popped   (see pop.lua)
    ARGV[1] session id (the queue member)
    ARGV[2] delete token (random, one per delete_session call; the same in its retries)
    ARGV[3] how long the tombstone is kept (ms, an integer in 1..2^53-1)
  Output:
    1 if the session existed (or this call's earlier attempt deleted it), 0 if not
    error "CS_BADARG ..."  malformed KEYS or ARGV (nothing deleted)
]]
local ttl = tonumber(ARGV[3])
if #KEYS ~= 10 or not ARGV[1] or ARGV[1] == '' or not ARGV[2] or ARGV[2] == ''
    or not (ttl and ttl >= 1 and ttl <= 9007199254740991 and ttl % 1 == 0) then
  return redis.error_reply('CS_BADARG delete: malformed arguments')
end
if redis.call('HGET', KEYS[9], 'token') == ARGV[2] then
  return 1  -- a retry: this call already deleted the session
end
local existed = redis.call('EXISTS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6], KEYS[8], KEYS[10])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
if existed == 1 then
  redis.call('HSET', KEYS[9], 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[9], ttl)
end
return existed
