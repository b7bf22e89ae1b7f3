-- wrk script for `make bench` (bench/bench.py):
--   wrk -t2 -c50 -d10s -s bench/post.lua URL -- TOKENS_FILE BODY_FILE [KEY_PREFIX]
-- Every request: POST BODY_FILE with Content-Type: application/json and
-- Authorization: Bearer <token>, the tokens taken round-robin from TOKENS_FILE
-- (one per line), each wrk thread starting at a different offset.
--
-- Without KEY_PREFIX all requests are formatted once in init(), so request()
-- costs wrk nothing per request. With KEY_PREFIX every request also carries
-- "Idempotency-Key: KEY_PREFIX-<thread>-<n>", n counting up per thread: a key
-- never sent before (bench.py makes the prefix unique per run). init() still
-- formats each request once, cut in two around the key, so request() only
-- joins three strings.
--
-- done() prints one line "BENCHJSON {...}" (latencies in microseconds) that
-- bench.py parses.

local heads, tails, count, next_index = {}, {}, 0, 0
local key_prefix, sent = nil, 0
local PLACEHOLDER = "\1KEY\1"

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

local function read_all(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local body = read_all(args[2])
  if args[3] then
    key_prefix = args[3] .. "-" .. tostring(thread_number or 0) .. "-"
  end
  for token in io.lines(args[1]) do
    if token ~= "" then
      count = count + 1
      local headers = {
        ["Authorization"] = "Bearer " .. token,
        ["Content-Type"] = "application/json",
      }
      if key_prefix then
        headers["Idempotency-Key"] = PLACEHOLDER
        local req = wrk.format("POST", nil, headers, body)
        local at = assert(req:find(PLACEHOLDER, 1, true))
        heads[count] = req:sub(1, at - 1)
        tails[count] = req:sub(at + #PLACEHOLDER)
      else
        heads[count] = wrk.format("POST", nil, headers, body)
      end
    end
  end
  assert(count > 0, "no tokens in " .. args[1])
  next_index = math.random(count) - 1
end

function request()
  next_index = next_index % count + 1
  if key_prefix == nil then
    return heads[next_index]
  end
  sent = sent + 1
  return heads[next_index] .. key_prefix .. string.format("%d", sent) .. tails[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"non2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
