-- Count a request refused before admission (e.g. a 400) against its key and user.
-- The argument is a JSON object with named fields (cluster/gate/scripts.py, RejectCall).
--
-- ARGV[1]: {record, digest ('' anonymous), user, reason, abuse_prefix, abuse_ttl_s,
--           auth_failures_prefix}
-- Returns 1 when counted against a key, 0 when the key is unknown.

local req = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
if req.digest ~= '' and redis.call('HGET', req.record, 'hash') ~= req.digest then
  local fails = req.auth_failures_prefix .. minute
  redis.call('INCR', fails)
  redis.call('EXPIRE', fails, req.abuse_ttl_s)
  return 0
end
local bucket = req.abuse_prefix .. minute
redis.call('HINCRBY', bucket, req.user .. '|rej', 1)
redis.call('HINCRBY', bucket, req.user .. '|rej:' .. req.reason, 1)
redis.call('EXPIRE', bucket, req.abuse_ttl_s)
return 1
