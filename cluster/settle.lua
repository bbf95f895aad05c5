-- Settlement: reservation -> real usage, release the slot, count usage and spend.
--
-- KEYS: 1 concurrency slots of the key, then (log zset, tokens hash) per scope the
--       request was admitted in
-- ARGV: 1 slot id, 2 real tokens, 3 prompt tokens, 4 completion tokens, 5 estimated cost,
--       6 outcome (ok|error|disconnected), 7 user, 8 abuse bucket prefix, 9 abuse ttl s,
--       10 spend prefix, 11 spend ttl s
-- Returns the token difference charged (negative: refunded).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot, used, outcome, user = ARGV[1], tonumber(ARGV[2]), ARGV[6], ARGV[7]

redis.call('ZREM', KEYS[1], slot)

-- An entry already out of the window counted its reservation then; nothing to move.
local delta = 0
for i = 2, #KEYS, 2 do
  if redis.call('ZSCORE', KEYS[i], slot) then
    local reserved = tonumber(redis.call('HGET', KEYS[i + 1], slot) or '0')
    redis.call('HSET', KEYS[i + 1], slot, used)
    redis.call('HINCRBY', KEYS[i + 1], '_sum', used - reserved)
    delta = used - reserved
  end
end

local bucket = ARGV[8] .. math.floor(now / 60000)
redis.call('HINCRBY', bucket, user .. '|tok', used)
if outcome ~= 'ok' then redis.call('HINCRBY', bucket, user .. '|' .. outcome, 1) end
redis.call('EXPIRE', bucket, tonumber(ARGV[9]))

local day = ARGV[10] .. math.floor(now / 86400000)
redis.call('HINCRBY', day, 'requests', 1)
redis.call('HINCRBY', day, 'prompt_tokens', tonumber(ARGV[3]))
redis.call('HINCRBY', day, 'completion_tokens', tonumber(ARGV[4]))
redis.call('HINCRBYFLOAT', day, 'cost', ARGV[5])
if outcome ~= 'ok' then redis.call('HINCRBY', day, outcome, 1) end
redis.call('EXPIRE', day, tonumber(ARGV[11]))
return delta
