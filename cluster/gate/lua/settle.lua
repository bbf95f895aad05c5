-- Settlement: reservation -> real usage, release the slot, count usage and spend.
-- The argument is a JSON object with named fields (cluster/gate/scripts.py, SettleCall).
--
-- ARGV[1]: {slots, windows = {{log, tokens}, ...} (the scopes holding the reservation),
--           slot_id, used (real tokens), prompt_tokens, completion_tokens, cost (a string:
--           exact decimal), outcome (ok|error|disconnected), user, abuse_prefix,
--           abuse_ttl_s, spend_prefix, spend_ttl_s}
-- Returns the token difference charged (negative: refunded).

local req = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot, used, outcome, user = req.slot_id, req.used, req.outcome, req.user

redis.call('ZREM', req.slots, slot)

-- An entry already out of the window counted its reservation then; nothing to move.
local delta = 0
for _, w in ipairs(req.windows) do
  if redis.call('ZSCORE', w[1], slot) then
    local reserved = tonumber(redis.call('HGET', w[2], slot) or '0')
    redis.call('HSET', w[2], slot, used)
    redis.call('HINCRBY', w[2], '_sum', used - reserved)
    delta = used - reserved
  end
end

local bucket = req.abuse_prefix .. math.floor(now / 60000)
redis.call('HINCRBY', bucket, user .. '|tok', used)
if outcome ~= 'ok' then redis.call('HINCRBY', bucket, user .. '|' .. outcome, 1) end
redis.call('EXPIRE', bucket, req.abuse_ttl_s)

local day = req.spend_prefix .. math.floor(now / 86400000)
redis.call('HINCRBY', day, 'requests', 1)
redis.call('HINCRBY', day, 'prompt_tokens', req.prompt_tokens)
redis.call('HINCRBY', day, 'completion_tokens', req.completion_tokens)
redis.call('HINCRBYFLOAT', day, 'cost', req.cost)
if outcome ~= 'ok' then redis.call('HINCRBY', day, outcome, 1) end
redis.call('EXPIRE', day, req.spend_ttl_s)
return delta
