-- Count a request refused before admission (e.g. a 400) against its key and user.
--
-- KEYS: 1 key record
-- ARGV: 1 key digest ('' anonymous), 2 user, 3 reason, 4 abuse bucket prefix,
--       5 abuse ttl s, 6 auth-failure counter prefix
-- Returns 1 when counted against a key, 0 when the key is unknown.

local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'hash') ~= ARGV[1] then
  local fails = ARGV[6] .. minute
  redis.call('INCR', fails)
  redis.call('EXPIRE', fails, tonumber(ARGV[5]))
  return 0
end
local bucket = ARGV[4] .. minute
redis.call('HINCRBY', bucket, ARGV[2] .. '|rej', 1)
redis.call('HINCRBY', bucket, ARGV[2] .. '|rej:' .. ARGV[3], 1)
redis.call('EXPIRE', bucket, tonumber(ARGV[5]))
return 1
