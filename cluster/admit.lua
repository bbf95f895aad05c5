-- Admission: authenticate, check every limit, reserve, count; one atomic round trip.
-- See cluster/limits.py for the design (sliding-window log per scope).
--
-- KEYS: 1 key record, 2 blocked users of the key, 3 concurrency slots of the key,
--       4/5 key scope (log zset, tokens hash), 6/7 user scope, 8/9 model scope
-- ARGV: 1 key digest, 2 user ('' none), 3 model, 4 reserve tokens, 5 slot id,
--       6/7/8 default rpm/tpm/max_concurrent, 9 model tpm (0 none), 10 window ms,
--       11 slot lease ms, 12 abuse bucket prefix, 13 abuse ttl s, 14 max-length flag,
--       15 anonymous flag, 16 auth-failure counter prefix
-- Returns {status, code, scope, limit, used, retry_ms,
--          lim_req, rem_req, reset_req_ms, lim_tok, rem_tok, reset_tok_ms,
--          rpm, tpm, max_concurrent, user_rpm, user_tpm, models, scope_mask}
-- (-1: no such limit). status 200 admitted; 401/403/429 refused (nothing reserved).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local digest, user, model = ARGV[1], ARGV[2], ARGV[3]
local reserve, slot = tonumber(ARGV[4]), ARGV[5]
local window, lease = tonumber(ARGV[10]), tonumber(ARGV[11])
local cutoff = now - window
local minute = math.floor(now / 60000)

local function num(v, default)
  if v and v ~= '' then return tonumber(v) end
  return default
end

local function bump(fields)
  local bucket = ARGV[12] .. minute
  for _, f in ipairs(fields) do redis.call('HINCRBY', bucket, user .. '|' .. f, 1) end
  redis.call('EXPIRE', bucket, tonumber(ARGV[13]))
end

-- scopes: {name, log, tokens, rpm, tpm, mask bit, count, token sum}
local scopes = {}
local rpm, tpm, conc, urpm, utpm, models

-- when the entry at 0-based rank `rank` leaves the window
local function expiry_of_rank(z, rank)
  local e = redis.call('ZRANGE', z, rank, rank, 'WITHSCORES')
  if #e == 0 then return 0 end
  return math.max(0, tonumber(e[2]) + window - now)
end

-- header values: per dimension, the scope with the least remaining
local function report(status, code, scope, limit, used, retry_ms, mask)
  local lr, rr, tr, lt, rt, tt = -1, -1, 0, -1, -1, 0
  for _, s in ipairs(scopes) do
    if s[7] then
      local reset = expiry_of_rank(s[2], 0)
      if s[4] > 0 and (rr < 0 or s[4] - s[7] < rr) then
        lr, rr, tr = s[4], math.max(0, s[4] - s[7]), reset
      end
      if s[5] > 0 and (rt < 0 or s[5] - s[8] < rt) then
        lt, rt, tt = s[5], math.max(0, s[5] - s[8]), reset
      end
    end
  end
  return {status, code, scope, limit or -1, used or 0, retry_ms or 0,
          lr, rr, tr, lt, rt, tt,
          rpm or -1, tpm or -1, conc or -1, urpm or -1, utpm or -1, models or '', mask or 0}
end

local function refuse(status, code, scope, limit, used, retry_ms)
  return report(status, code, scope, limit, used, retry_ms, 0)
end

-- 1. who is calling, and may they
if ARGV[15] == '1' then
  rpm, tpm, conc = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  urpm, utpm, models = 0, 0, ''
else
  local rec = redis.call('HMGET', KEYS[1], 'hash', 'revoked', 'blocked', 'rpm', 'tpm',
                         'max_concurrent', 'user_rpm', 'user_tpm', 'models')
  if not rec[1] or rec[1] ~= digest then
    local fails = ARGV[16] .. minute
    redis.call('INCR', fails)
    redis.call('EXPIRE', fails, tonumber(ARGV[13]))
    return refuse(401, 'invalid_api_key', 'key')
  end
  if rec[2] == '1' then return refuse(401, 'revoked', 'key') end
  if rec[3] == '1' then
    bump({'rej', 'rej:403'})
    return refuse(403, 'key_blocked', 'key')
  end
  rpm, tpm, conc = num(rec[4], tonumber(ARGV[6])), num(rec[5], tonumber(ARGV[7])),
                   num(rec[6], tonumber(ARGV[8]))
  urpm, utpm, models = num(rec[7], 0), num(rec[8], 0), rec[9] or ''
end
if user ~= '' and redis.call('SISMEMBER', KEYS[2], user) == 1 then
  bump({'rej', 'rej:403'})
  return refuse(403, 'user_blocked', 'user')
end
if models ~= '' and not string.find(models, ',' .. model .. ',', 1, true) then
  bump({'rej', 'rej:403'})
  return refuse(403, 'model_not_allowed', 'key')
end

-- 2. the scopes; a scope with no limit is not tracked
local mtpm = tonumber(ARGV[9])
if rpm > 0 or tpm > 0 then table.insert(scopes, {'key', KEYS[4], KEYS[5], rpm, tpm, 1}) end
if user ~= '' and (urpm > 0 or utpm > 0) then
  table.insert(scopes, {'user', KEYS[6], KEYS[7], urpm, utpm, 2})
end
if mtpm > 0 then table.insert(scopes, {'model', KEYS[8], KEYS[9], 0, mtpm, 4}) end

-- drop entries admitted before the window, and their tokens from the running sum
local function trim(z, h)
  while true do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, 500)
    if #old == 0 then return end
    local toks = redis.call('HMGET', h, unpack(old))
    local freed = 0
    for i = 1, #toks do freed = freed + (tonumber(toks[i]) or 0) end
    redis.call('HINCRBY', h, '_sum', -freed)
    redis.call('HDEL', h, unpack(old))
    redis.call('ZREM', z, unpack(old))
    if #old < 500 then return end
  end
end

-- when enough tokens leave the window for `need` more to fit under `limit`; looks at the
-- 1000 oldest entries at most (a refusal must stay cheap) and then answers with the
-- last one's expiry, a lower bound: the client is told again when it retries
local function token_retry(z, h, sum, limit, need)
  local excess = sum + need - limit
  local freed, last = 0, window
  for start = 0, 800, 200 do
    local page = redis.call('ZRANGE', z, start, start + 199, 'WITHSCORES')
    if #page == 0 then break end
    local ids = {}
    for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
    local toks = redis.call('HMGET', h, unpack(ids))
    for i = 1, #ids do
      freed = freed + (tonumber(toks[i]) or 0)
      last = math.max(0, tonumber(page[2 * i]) + window - now)
      if freed >= excess then return last end
    end
  end
  return last
end

for _, s in ipairs(scopes) do
  trim(s[2], s[3])
  s[7] = redis.call('ZCARD', s[2])
  s[8] = tonumber(redis.call('HGET', s[3], '_sum') or '0')
end

-- 3. limits; nothing is written unless every check passes
local function check_scope(s)
  if s[4] > 0 and s[7] + 1 > s[4] then
    bump({'rej', 'rej:429'})
    return refuse(429, 'requests', s[1], s[4], s[7], expiry_of_rank(s[2], s[7] - s[4]))
  end
  if s[5] > 0 and reserve > s[5] then
    bump({'rej', 'rej:429'})
    return refuse(429, 'too_large', s[1], s[5], s[8], 1000)  -- waiting cannot help
  end
  if s[5] > 0 and s[8] + reserve > s[5] then
    bump({'rej', 'rej:429'})
    return refuse(429, 'tokens', s[1], s[5], s[8], token_retry(s[2], s[3], s[8], s[5], reserve))
  end
  return nil
end

for _, s in ipairs(scopes) do
  local refused = check_scope(s)
  if refused then return refused end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- leases of vanished requests
  local running = redis.call('ZCARD', KEYS[3])
  if running >= conc then
    bump({'rej', 'rej:429'})
    return refuse(429, 'concurrency', 'key', conc, running, 1000)
  end
end

-- 4. reserve, count, and report
local mask = 0
for _, s in ipairs(scopes) do
  redis.call('ZADD', s[2], now, slot)
  redis.call('HSET', s[3], slot, reserve)
  redis.call('HINCRBY', s[3], '_sum', reserve)
  redis.call('PEXPIRE', s[2], window + 1000)
  redis.call('PEXPIRE', s[3], window + 1000)
  s[7], s[8] = s[7] + 1, s[8] + reserve
  mask = mask + s[6]
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, slot)
  redis.call('PEXPIRE', KEYS[3], lease + 1000)
end
if ARGV[14] == '1' then bump({'req', 'maxlen'}) else bump({'req'}) end

return report(200, 'ok', '', -1, 0, 0, mask)
