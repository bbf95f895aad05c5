-- Settlement: reservation -> real usage, release the slot, count usage and spend, charge
-- the budgets, append the request to the usage ledger. Idempotent by request id: a
-- retried settlement (a lost reply, an outage's backlog) changes nothing the second time.
-- The argument is a JSON object with named fields (cluster/gate/scripts.py, SettleCall).
--
-- KEYS: slots, each window scope's log and tokens, settled marker, ledger.
-- ARGV[1]: {slots, windows = {{log, tokens}, ...} (the scopes holding the reservation),
--           slot_id (the request id), settled (its marker key), dedupe_s, used (real
--           tokens), prompt_tokens, completion_tokens, cached_tokens, cost (a string: exact
--           decimal USD), cost_nano, reserved_nano, budget_bits (1 key/day, 2 key/month,
--           4 user/day, 8 user/month hold reserved_nano), day, month (the periods charged),
--           outcome (ok|error|disconnected), user, key_id, model, endpoint, status,
--           latency_ms, at_ms (when it ended), abuse_prefix, abuse_ttl_s, spend_prefix,
--           user_spend_prefix, spend_ttl_s, ttl_by_bit (user day/month hashes, by budget
--           bit), ledger, ledger_retention_ms}
-- Returns {applied (false: settled before), delta (tokens charged; negative: refunded)}.

local req = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot, used, outcome, user = req.slot_id, req.used, req.outcome, req.user

if not redis.call('SET', req.settled, '1', 'NX', 'EX', req.dedupe_s) then
  return cjson.encode({applied = false, delta = 0})
end

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

-- spend and budgets: the real cost replaces the worst case reserved at admission
local function charge(hash, mask)
  redis.call('HINCRBY', hash, 'requests', 1)
  redis.call('HINCRBY', hash, 'cost_nano', req.cost_nano)
  if bit.band(req.budget_bits, mask) ~= 0 and
      redis.call('HINCRBY', hash, 'reserved_nano', -req.reserved_nano) < 0 then
    redis.call('HSET', hash, 'reserved_nano', 0)  -- a Redis restarted without its data
  end
  redis.call('EXPIRE', hash, req.ttl_by_bit[tostring(mask)] or req.spend_ttl_s)
end
local day = req.spend_prefix .. req.day
charge(day, 1)
redis.call('HINCRBY', day, 'prompt_tokens', req.prompt_tokens)
redis.call('HINCRBY', day, 'completion_tokens', req.completion_tokens)
redis.call('HINCRBY', day, 'cached_tokens', req.cached_tokens)
redis.call('HINCRBYFLOAT', day, 'cost', req.cost)
if outcome ~= 'ok' then redis.call('HINCRBY', day, outcome, 1) end
charge(req.spend_prefix .. 'm' .. req.month, 2)
if user ~= '' then
  charge(req.user_spend_prefix .. user .. ':' .. req.day, 4)
  charge(req.user_spend_prefix .. user .. ':m' .. req.month, 8)
end

redis.call('XADD', req.ledger, 'MINID', '~', tostring(now - req.ledger_retention_ms), '*',
  'request_id', slot, 'ts', req.at_ms, 'key_id', req.key_id, 'user', user,
  'model', req.model, 'endpoint', req.endpoint, 'prompt_tokens', req.prompt_tokens,
  'completion_tokens', req.completion_tokens, 'cached_tokens', req.cached_tokens,
  'cost_nano', req.cost_nano, 'cost', req.cost, 'status', req.status,
  'latency_ms', req.latency_ms, 'outcome', outcome)
return cjson.encode({applied = true, delta = delta})
