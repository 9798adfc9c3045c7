-- Applies one accepted event to the shared state, at most once per event id.
-- KEYS: 1 the event id's claim, 2 history, 3 dislikes, 4 purchases, 5 shown slots,
--       6 recent requests, 7 the events stream, 8 the statistics stream
-- ARGV: 1 claim lifetime (ms), 2 event type, 3 item id, 4 history length, 5 dislikes kept,
--       6 purchases kept, 7 user state lifetime (ms), 8 origin, 9 popularity weight,
--       10 event time (ms), 11 the events stream's approximate length cap,
--       12 the event's statistics updates (JSON, '' for none), 13 their batch key,
--       14 the user id, 15 the interaction for other processes' encoders (JSON, '' for none)
-- Returns 0 when the event id was applied before, else 1.
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local kind, item = ARGV[2], ARGV[3]
local function push(key, cap)
  cap = tonumber(cap)
  if cap < 1 then
    redis.call('DEL', key)
    return
  end
  redis.call('RPUSH', key, item)
  redis.call('LTRIM', key, -cap, -1)
end
if kind == 'dislike' then
  push(KEYS[3], ARGV[5])
elseif kind == 'click' or kind == 'add_to_cart' or kind == 'purchase' then
  push(KEYS[2], ARGV[4])
  redis.call('LREM', KEYS[5], 0, item)
  if kind == 'purchase' and not redis.call('LPOS', KEYS[4], item) then
    push(KEYS[4], ARGV[6])
  end
end
for i = 2, 6 do
  redis.call('PEXPIRE', KEYS[i], ARGV[7])
end
if tonumber(ARGV[9]) ~= 0 or ARGV[15] ~= '' then
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[11], '*',
    'o', ARGV[8], 'i', item, 'w', ARGV[9], 't', ARGV[10], 'u', ARGV[14], 'x', ARGV[15])
end
if ARGV[12] ~= '' then
  redis.call('XADD', KEYS[8], '*', 'b', ARGV[13], 'u', ARGV[12])
end
return 1
