-- Admission: authenticate, check every limit, reserve, count; one atomic round trip.
-- See cluster/gate/redis_gate.py for the design (sliding-window log per scope). The
-- argument and the reply are JSON objects with named fields, encoded and decoded in one
-- place: cluster/gate/scripts.py (AdmitCall, Decision). KEYS lists every key touched.
--
-- ARGV[1]: {keys = {record, blocked_users, user_actions, user_budgets, slots, key_log,
--           key_tokens, user_log, user_tokens, model_log, model_tokens}, abuse_prefix,
--           auth_failures_prefix, spend_prefix, user_spend_prefix, spend_ttl_s,
--           ttl_by_bit (of the user day/month hashes, by budget bit), digest,
--           user ('' none), model, reserve, reserve_nano (worst-case cost), slot_id,
--           default_rpm, default_tpm, default_max_concurrent, model_tpm (0 none), window_ms,
--           lease_ms, abuse_ttl_s, max_length, anonymous, now_ms (tests only; else TIME)}
-- Returns {code, scope, limit, used, retry_ms, period, rate = {...}, key = {...},
-- scope_bits, budget = {bits, day, month, ...}, user_action}: code 'ok' admitted;
-- anything else refused, with nothing reserved. -1: no such limit.

local req = cjson.decode(ARGV[1])
local K = req.keys
local now = req.now_ms
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local digest, user, model = req.digest, req.user, req.model
local reserve, slot = req.reserve, req.slot_id
local window, lease = req.window_ms, req.lease_ms
local cutoff = now - window
local minute = math.floor(now / 60000)
local day = math.floor(now / 86400000)

-- the UTC calendar date of a day number (H. Hinnant's civil_from_days)
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y, m, d
end
local year, month_of_year, mday = civil(day)
local month = year * 12 + month_of_year - 1
local leap = (year % 4 == 0 and year % 100 ~= 0) or year % 400 == 0
local month_days = ({31, leap and 29 or 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31})
                   [month_of_year]

local function num(v, default)
  if v and v ~= '' then return tonumber(v) end
  return default
end

local function bump(fields)
  local bucket = req.abuse_prefix .. minute
  for _, f in ipairs(fields) do redis.call('HINCRBY', bucket, user .. '|' .. f, 1) end
  redis.call('EXPIRE', bucket, req.abuse_ttl_s)
end

-- scopes: {name, log, tokens, rpm, tpm, scope bit, count, token sum}
local scopes = {}
local rpm, tpm, conc, urpm, utpm, models
local budget_limits = {}  -- record field -> nano-dollars, for the budgets the key has
-- per scope kind, the least budget left after this request and when that budget resets
-- (for the in-memory limiter of fail-open mode); -1: no budget
local left = {key = {-1, 0}, user = {-1, 0}}
-- the user's live abuse action, for the in-memory limiter too: null until it is looked up,
-- then {action = '' (none) | 'block' | 'throttle', rpm, left_ms}
local live_action = cjson.null

-- when the entry at 0-based rank `rank` leaves the window
local function expiry_of_rank(z, rank)
  local e = redis.call('ZRANGE', z, rank, rank, 'WITHSCORES')
  if #e == 0 then return 0 end
  return math.max(0, tonumber(e[2]) + window - now)
end

-- header values: per dimension, the scope with the least remaining
local function report(code, scope, limit, used, retry_ms, bits, budget_bits, period)
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
  local key = cjson.null
  if rpm then
    key = {rpm = rpm, tpm = tpm, max_concurrent = conc, user_rpm = urpm, user_tpm = utpm,
           models = models}
  end
  return cjson.encode({code = code, scope = scope, limit = limit or -1, used = used or 0,
    retry_ms = retry_ms or 0, scope_bits = bits or 0, key = key, period = period or '',
    budget = {bits = budget_bits or 0, day = day, month = month,
              key_left = left.key[1], key_reset_ms = left.key[2],
              user_left = left.user[1], user_reset_ms = left.user[2]},
    user_action = live_action,
    rate = {limit_requests = lr, remaining_requests = rr, reset_requests_ms = tr,
            limit_tokens = lt, remaining_tokens = rt, reset_tokens_ms = tt}})
end

local function refuse(code, scope, limit, used, retry_ms, period)
  return report(code, scope, limit, used, retry_ms, 0, 0, period)
end

-- 1. who is calling, and may they
if req.anonymous then
  rpm, tpm, conc = req.default_rpm, req.default_tpm, req.default_max_concurrent
  urpm, utpm, models = 0, 0, ''
else
  local rec = redis.call('HMGET', K.record, 'hash', 'revoked', 'blocked', 'rpm', 'tpm',
                         'max_concurrent', 'user_rpm', 'user_tpm', 'models', 'budget_day',
                         'budget_month', 'user_budget_day', 'user_budget_month')
  if not rec[1] or rec[1] ~= digest then
    local fails = req.auth_failures_prefix .. minute
    redis.call('INCR', fails)
    redis.call('EXPIRE', fails, req.abuse_ttl_s)
    return refuse('invalid_api_key', 'key')
  end
  if rec[2] == '1' then return refuse('revoked', 'key') end
  if rec[3] == '1' then
    bump({'rej', 'rej:forbidden'})
    return refuse('key_blocked', 'key')
  end
  rpm, tpm, conc = num(rec[4], req.default_rpm), num(rec[5], req.default_tpm),
                   num(rec[6], req.default_max_concurrent)
  urpm, utpm, models = num(rec[7], 0), num(rec[8], 0), rec[9] or ''
  budget_limits = {key_day = num(rec[10]), key_month = num(rec[11]),
                   user_day = num(rec[12]), user_month = num(rec[13])}
  -- the user's own budgets, in place of the key's per-user ones (null: the key's)
  local own = user ~= '' and redis.call('HGET', K.user_budgets, user)
  if own then
    own = cjson.decode(own)
    if own.day ~= cjson.null then budget_limits.user_day = own.day end
    if own.month ~= cjson.null then budget_limits.user_month = own.month end
  end
end
if user ~= '' and redis.call('SISMEMBER', K.blocked_users, user) == 1 then
  bump({'rej', 'rej:forbidden'})
  return refuse('user_blocked', 'user')
end
-- a live abuse action on this user (written by the abuse monitor; expired ones are ignored)
local throttled = false
if user ~= '' then
  local raw = redis.call('HGET', K.user_actions, user)
  local act = raw and cjson.decode(raw)
  live_action = {action = '', rpm = 0, left_ms = 0}
  if act and act.until_ms > now and (act.action == 'block' or act.action == 'throttle') then
    live_action = {action = act.action, rpm = act.rpm or 0, left_ms = act.until_ms - now}
    if act.action == 'block' then
      bump({'rej', 'rej:forbidden'})
      return refuse('user_blocked', 'user', -1, 0, live_action.left_ms)
    elseif live_action.rpm > 0 and (urpm == 0 or live_action.rpm < urpm) then
      urpm, throttled = live_action.rpm, true
    end
  end
end
if models ~= '' and not string.find(models, ',' .. model .. ',', 1, true) then
  bump({'rej', 'rej:forbidden'})
  return refuse('model_not_allowed', 'key')
end

-- 2. the scopes; a scope with no limit is not tracked
local mtpm = req.model_tpm
if rpm > 0 or tpm > 0 then table.insert(scopes, {'key', K.key_log, K.key_tokens, rpm, tpm, 1}) end
if user ~= '' and (urpm > 0 or utpm > 0) then
  table.insert(scopes, {'user', K.user_log, K.user_tokens, urpm, utpm, 2})
end
if mtpm > 0 then table.insert(scopes, {'model', K.model_log, K.model_tokens, 0, mtpm, 4}) end

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
    bump({'rej', 'rej:rate_limited'})
    local scope = (s[1] == 'user' and throttled) and 'throttled' or s[1]
    return refuse('requests', scope, s[4], s[7], expiry_of_rank(s[2], s[7] - s[4]))
  end
  if s[5] > 0 and reserve > s[5] then
    bump({'rej', 'rej:rate_limited'})
    return refuse('too_large', s[1], s[5], s[8], 1000)  -- waiting cannot help
  end
  if s[5] > 0 and s[8] + reserve > s[5] then
    bump({'rej', 'rej:rate_limited'})
    return refuse('tokens', s[1], s[5], s[8], token_retry(s[2], s[3], s[8], s[5], reserve))
  end
  return nil
end

for _, s in ipairs(scopes) do
  local refused = check_scope(s)
  if refused then return refused end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', K.slots, '-inf', now)  -- leases of vanished requests
  local running = redis.call('ZCARD', K.slots)
  if running >= conc then
    bump({'rej', 'rej:rate_limited'})
    return refuse('concurrency', 'key', conc, running, 1000)
  end
end

-- 3b. budgets (USD, in nano-dollars): spent + reserved + this request's worst case
local reserve_nano = req.reserve_nano
local day_left = 86400000 - (now - day * 86400000)
local month_left = day_left + (month_days - mday) * 86400000
local budgets = {}  -- {hash, bit}
local function add_budget(field, scope, period, hash, bit, reset)
  local limit = budget_limits[field]
  if not limit then return nil end
  local got = redis.call('HMGET', hash, 'cost_nano', 'reserved_nano')
  local used = num(got[1], 0) + num(got[2], 0)
  if used + reserve_nano > limit then
    bump({'rej', 'rej:insufficient_quota'})
    return refuse('budget', scope, limit, used, reset, period)
  end
  table.insert(budgets, {hash, bit})
  local rest = limit - used - reserve_nano
  if left[scope][1] < 0 or rest < left[scope][1] then left[scope] = {rest, reset} end
  return nil
end
local sp, usp = req.spend_prefix, req.user_spend_prefix
local refused = add_budget('key_day', 'key', 'day', sp .. day, 1, day_left)
  or add_budget('key_month', 'key', 'month', sp .. 'm' .. month, 2, month_left)
if not refused and user ~= '' then
  refused = add_budget('user_day', 'user', 'day', usp .. user .. ':' .. day, 4, day_left)
    or add_budget('user_month', 'user', 'month', usp .. user .. ':m' .. month, 8, month_left)
end
if refused then return refused end

-- 4. reserve, count, and report
local budget_bits = 0
for _, b in ipairs(budgets) do
  redis.call('HINCRBY', b[1], 'reserved_nano', reserve_nano)
  redis.call('EXPIRE', b[1], req.ttl_by_bit[tostring(b[2])] or req.spend_ttl_s)
  budget_bits = budget_bits + b[2]
end
local bits = 0
for _, s in ipairs(scopes) do
  redis.call('ZADD', s[2], now, slot)
  redis.call('HSET', s[3], slot, reserve)
  redis.call('HINCRBY', s[3], '_sum', reserve)
  redis.call('PEXPIRE', s[2], window + 1000)
  redis.call('PEXPIRE', s[3], window + 1000)
  s[7], s[8] = s[7] + 1, s[8] + reserve
  bits = bits + s[6]
end
if conc > 0 then
  redis.call('ZADD', K.slots, now + lease, slot)
  redis.call('PEXPIRE', K.slots, lease + 1000)
end
if req.max_length then bump({'req', 'maxlen'}) else bump({'req'}) end

return report('ok', '', -1, 0, 0, bits, budget_bits)
