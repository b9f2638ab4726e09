-- wrk script for `make bench`: POST pre-generated, signed Postal deliveries (bench/pool.py), one per request.
--
--   wrk -t2 -c8 -d10s --latency -s bench/post.lua http://127.0.0.1:PORT/postal/inbound \
--       -- <index.txt> <bodies.bin> <first> <threads> <unique|cycle>
--
-- Thread t sends deliveries first+t, first+t+threads, first+t+2*threads, ... so no two requests of a run
-- carry the same delivery. Past the end of the pool it wraps to the start: in "unique" mode that is
-- reported (the bridge would answer those as duplicates), in "cycle" mode (the bare baseline, which
-- stores nothing) it is expected. Bodies are read from the file per request (page cache), not held in
-- memory. done() prints one line, "BENCH {json}", that bench/__main__.py parses.
--
-- It must never send anything but the pool's requests, and only to the URL it is given.

local counter = 0
local threads = {}

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local entries = {}
local data
local first, stride, mode
sent, ok, bad, wrapped = 0, 0, 0, 0

function init(args)
   local index_path, data_path = args[1], args[2]
   first, stride, mode = tonumber(args[3]), tonumber(args[4]), args[5]
   for line in io.lines(index_path) do
      local off, len, kid, sig = line:match("^(%d+) (%d+) (%S+) (%S+)$")
      entries[#entries + 1] = { tonumber(off), tonumber(len), kid, sig }
   end
   data = assert(io.open(data_path, "rb"))
end

function request()
   local i = first + tid + stride * sent
   sent = sent + 1
   if i >= #entries then
      wrapped = 1
      i = i % #entries
   end
   local e = entries[i + 1]
   data:seek("set", e[1])
   local body = data:read(e[2])
   local headers = {
      ["Content-Type"] = "application/json",
      ["X-Postal-Signature-Kid"] = e[3],
      ["X-Postal-Signature-256"] = e[4],
   }
   return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local max_sent, total_ok, total_bad, any_wrapped = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      max_sent = math.max(max_sent, thread:get("sent"))
      total_ok = total_ok + thread:get("ok")
      total_bad = total_bad + thread:get("bad")
      any_wrapped = math.max(any_wrapped, thread:get("wrapped"))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH {"duration_us":%d,"requests":%d,"ok":%d,"non2xx":%d,"sent_per_thread":%d,"wrapped":%d,'
         .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
         .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.duration, summary.requests, total_ok, total_bad, max_sent, any_wrapped,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean
   ))
end
