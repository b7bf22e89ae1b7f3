-- wrk script for `make bench` (bench/bench.py):
--   wrk -t2 -c50 -d10s -s bench/post.lua URL -- TOKENS_FILE BODY_FILE
-- Every request: POST BODY_FILE with Content-Type: application/json and
-- Authorization: Bearer <token>, the tokens taken round-robin from TOKENS_FILE
-- (one per line), each wrk thread starting at a different offset. All requests
-- are formatted once in init(), so request() costs wrk nothing per request.
-- done() prints one line "BENCHJSON {...}" (latencies in microseconds) that
-- bench.py parses.

local prebuilt, count, next_index = {}, 0, 0

local function read_all(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local body = read_all(args[2])
  for token in io.lines(args[1]) do
    if token ~= "" then
      count = count + 1
      prebuilt[count] = wrk.format("POST", nil, {
        ["Authorization"] = "Bearer " .. token,
        ["Content-Type"] = "application/json",
      }, body)
    end
  end
  assert(count > 0, "no tokens in " .. args[1])
  next_index = math.random(count) - 1
end

function request()
  next_index = next_index % count + 1
  return prebuilt[next_index]
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
