-- onrec bandit statistics: apply a batch of updates atomically (see store/redis.rs).
--
-- KEYS[1]          sorted set of segments, scored by last write (ms)
-- KEYS[2s], [2s+1] arms hash and totals hash of the s-th segment of the batch
-- KEYS[#KEYS]      the batch's key: set once the batch is applied
-- ARGV[1..8]       now_ms, half_life_ms (0: no decay), ttl_ms (0: none), max_arms,
--                  max_segments, key prefix, rebase_half_lives, batch key lifetime (ms)
-- then per segment: name, update count k, and k times: item, impressions, reward, at_ms
-- (the client leaves out updates that change nothing, and segments without updates)
--
-- Values are stored as v * 2^((at - l) / half_life) against the segment's landmark l
-- (field `l` of the totals hash); readers multiply by 2^((l - now) / half_life).

local now = tonumber(ARGV[1])
local hl = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max_arms = tonumber(ARGV[4])
local max_segments = tonumber(ARGV[5])
local prefix = ARGV[6]
local rebase_after = tonumber(ARGV[7])
local batch_ttl = tonumber(ARGV[8])
local forget_below = 1e-6

-- %.17g round-trips doubles; Lua's tostring (%.14g) would not.
local function fmt(x)
  return string.format('%.17g', x)
end

-- Stored values per item: {impressions, reward}; only fields that exist.
local function read_arms(arms)
  local flat = redis.call('HGETALL', arms)
  local items = {}
  for x = 1, #flat, 2 do
    local field = flat[x]
    local id = string.sub(field, 3)
    local e = items[id]
    if not e then
      e = {0, 0}
      items[id] = e
    end
    if string.sub(field, 1, 2) == 'i:' then
      e[1] = tonumber(flat[x + 1])
    else
      e[2] = tonumber(flat[x + 1])
    end
  end
  return items
end

local function rebase(arms, total, factor)
  local items = read_arms(arms)
  redis.call('DEL', arms)
  for id, e in pairs(items) do
    local i, r = e[1] * factor, e[2] * factor
    if math.abs(i) >= forget_below or math.abs(r) >= forget_below then
      if e[1] ~= 0 then redis.call('HSET', arms, 'i:' .. id, fmt(i)) end
      if e[2] ~= 0 then redis.call('HSET', arms, 'r:' .. id, fmt(r)) end
    end
  end
  for _, f in ipairs({'i', 'r'}) do
    local v = tonumber(redis.call('HGET', total, f) or '0')
    if v ~= 0 then redis.call('HSET', total, f, fmt(v * factor)) end
  end
end

-- Keeps the `keep` most shown items.
local function prune(arms, keep)
  local items = read_arms(arms)
  local list = {}
  for id, e in pairs(items) do
    list[#list + 1] = {id, e[1]}
  end
  if #list <= keep then return end
  table.sort(list, function(a, b) return a[2] < b[2] end)
  for x = 1, #list - keep do
    redis.call('HDEL', arms, 'i:' .. list[x][1], 'r:' .. list[x][1])
  end
end

-- A batch is applied once: a batch that finds its key set was applied before, and this
-- is a retry after its answer was lost.
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', batch_ttl) then
  return 0
end

local pos = 9
for s = 1, (#KEYS - 2) / 2 do
  local arms, total = KEYS[2 * s], KEYS[2 * s + 1]
  local segment = ARGV[pos]
  local k = tonumber(ARGV[pos + 1])
  pos = pos + 2
  local l = 0
  if hl > 0 then
    local stored = redis.call('HGET', total, 'l')
    if stored then
      l = tonumber(stored)
      if now - l > rebase_after * hl then
        rebase(arms, total, 2 ^ ((l - now) / hl))
        l = now
        redis.call('HSET', total, 'l', fmt(l))
      end
    else
      l = now
      redis.call('HSET', total, 'l', fmt(l))
    end
  end
  local written = false
  for _ = 1, k do
    local item = ARGV[pos]
    local di, dr, at = tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2]), tonumber(ARGV[pos + 3])
    pos = pos + 4
    local w = 1
    if hl > 0 then w = 2 ^ ((at - l) / hl) end
    if di ~= 0 then
      redis.call('HINCRBYFLOAT', arms, 'i:' .. item, fmt(di * w))
      redis.call('HINCRBYFLOAT', total, 'i', fmt(di * w))
      written = true
    end
    if dr ~= 0 then
      redis.call('HINCRBYFLOAT', arms, 'r:' .. item, fmt(dr * w))
      redis.call('HINCRBYFLOAT', total, 'r', fmt(dr * w))
      written = true
    end
  end
  if written then
    if redis.call('HLEN', arms) > 2 * max_arms then
      prune(arms, max_arms - math.floor(max_arms / 8))
    end
    if ttl > 0 then
      redis.call('PEXPIRE', arms, ttl)
      redis.call('PEXPIRE', total, ttl)
    end
    redis.call('ZADD', KEYS[1], now, segment)
  end
end

-- Segments whose keys expired, then the least recently written beyond the limit.
if ttl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now - ttl))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local count = redis.call('ZCARD', KEYS[1])
if count > max_segments then
  local keep = math.max(max_segments - math.floor(max_segments / 8), 1)
  local victims = redis.call('ZPOPMIN', KEYS[1], count - keep)
  for x = 1, #victims, 2 do
    redis.call('DEL', prefix .. ':' .. victims[x] .. ':arms', prefix .. ':' .. victims[x] .. ':total')
  end
end
return count
