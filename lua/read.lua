--[[
  Read what to send to the model: the session's head (leading system messages and the running
  summary) and the newest messages that fit a token budget, never starting the window with a
  tool result cut off from its tool call. The cost follows the budget, not the history length.
  Input:
    KEYS[1] messages list    <prefix>:{<shard>}:s:<sid>:msgs
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    ARGV[1] session id (for error messages)
    ARGV[2] budget in tokens (0 = the session's token limit)
    ARGV[3] tokens added once per request (reply priming)
    ARGV[4] messages fetched per LRANGE while walking back from the newest (>= 1)
    Every number is an integer in 0..2^53-1 (MAX, the largest a Lua number holds exactly).
  Output:
    {"OK", head messages, window messages (oldest first), used tokens, budget}
    {"SMALL", head messages, {}, tokens the head and priming need, budget}
      the budget cannot hold the head; the caller raises
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_CORRUPT ..."    its meta counts messages but its list is missing, or its meta is
                              missing but its messages survive (evicted)
    error "CS_BADARG ..."     malformed ARGV (only a caller bypassing the client sees this)
]]
local MAX = 9007199254740991  -- 2^53 - 1
local msgs, meta = KEYS[1], KEYS[2]
local budget, priming, chunk = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- Each number check is written so that NaN (false in every comparison) fails it.
if not (budget and budget >= 0 and budget <= MAX and budget % 1 == 0)
    or not (priming and priming >= 0 and priming <= MAX and priming % 1 == 0)
    or not (chunk and chunk >= 1 and chunk <= MAX and chunk % 1 == 0) or not ARGV[1] then
  return redis.error_reply('CS_BADARG read: malformed arguments')
end
local m = redis.call('HMGET', meta, 'token_limit', 'head_count', 'message_count')
if not m[1] then
  -- Messages without meta: the meta hash was evicted (a session never loses it otherwise).
  -- Keys about to expire (< 1 s) are leftovers of a TTL: the session is gone.
  local left = redis.call('PTTL', msgs)
  if left == -1 or left > 1000 then
    return redis.error_reply('CS_CORRUPT session ' .. ARGV[1] .. ': its meta hash ' .. meta ..
      ' is missing but its messages survive in ' .. msgs .. ' (evicted? use maxmemory-policy' ..
      ' noeviction); delete the session or restore it')
  end
  return redis.error_reply('CS_NOSESSION session ' .. ARGV[1] .. ' does not exist')
end
if budget == 0 then budget = tonumber(m[1]) end
local head_count = tonumber(m[2]) or 0
local total = tonumber(m[3]) or 0
if total > 0 and redis.call('EXISTS', msgs) == 0 then
  return redis.error_reply('CS_CORRUPT session ' .. ARGV[1] .. ': ' .. msgs .. ' is missing' ..
    ' although its meta counts ' .. total .. ' messages (evicted? use maxmemory-policy' ..
    ' noeviction); delete the session or restore it')
end

-- Records written by convstate start with {"tokens":N,"role":"...": read both without
-- decoding the whole message. Anything else is decoded.
local function cost(raw)
  local tokens, role = string.match(raw, '^{"tokens":(%d+),"role":"(%a+)"')
  if tokens then
    return tonumber(tokens), role
  end
  local msg = cjson.decode(raw)
  return tonumber(msg.tokens) or 0, msg.role
end

local used = priming
local head = {}
if head_count > 0 then
  head = redis.call('LRANGE', msgs, 0, head_count - 1)
  for _, raw in ipairs(head) do
    used = used + cost(raw)
  end
end
if used > budget then
  return {'SMALL', head, {}, used, budget}
end

-- Walk back from the newest message, a chunk at a time, while messages fit.
local picked, roles, costs = {}, {}, {}
local stop = total - 1   -- index of the next message to look at
local full = false
while not full and stop >= head_count do
  local start = math.max(head_count, stop - chunk + 1)
  local part = redis.call('LRANGE', msgs, start, stop)
  for i = #part, 1, -1 do
    local tokens, role = cost(part[i])
    if used + tokens > budget then
      full = true
      break
    end
    used = used + tokens
    picked[#picked + 1] = part[i]
    roles[#roles + 1] = role
    costs[#costs + 1] = tokens
  end
  stop = start - 1
end
-- A window that starts with tool results lost their tool call: drop them.
local last = #picked
while last > 0 and roles[last] == 'tool' do
  used = used - costs[last]
  last = last - 1
end
local window = {}
for i = last, 1, -1 do window[#window + 1] = picked[i] end
return {'OK', head, window, used, budget}
