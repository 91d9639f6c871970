-- wrk script of the clinicomm bench (bench/load.py runs it): POST /api/v1/communications with
-- a body and an Idempotency-Key of its own on every request, clinics round robin.
--
-- wrk -t T -c C -d Ds -s bench/wrk_post.lua URL -- <run> <channel> <token> <threads> <rate> <clinic>...
-- done() prints one line "CLINICOMM_WRK <json>": requests, status counts, errors, latency.
--
-- <rate> 0: every connection sends its next request as soon as the last one is answered (flat
-- out). <rate> R > 0: requests leave at R per second in all, on a schedule (each thread sends
-- R / T per second; the k-th request of a thread is due k * T / R seconds after its first),
-- whatever the answers' latency, as long as a connection is free: an open loop, given enough
-- connections. wrk measures a request's latency from when it is written, so the wait for
-- its slot is not counted.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  run = args[1]
  channel = args[2]
  token = args[3]
  nthreads = tonumber(args[4])
  local rate = tonumber(args[5])
  if rate > 0 then
    interval_ms = 1000 * nthreads / rate
  else
    delay = nil -- wrk asks for a delay only when the script defines one
  end
  clinics = {}
  for i = 6, #args do
    clinics[#clinics + 1] = args[i]
  end
  statuses = {}
end

local function body(i, clinic)
  local recipient
  local extra = ""
  if channel == "email" then
    recipient = '{"email":"patient' .. i .. '@example.com"}'
  else
    recipient = '{"phone":"+14155552671"}'
    extra = ',"template":{"name":"appointmentConfirmation","language":"en",'
      .. '"variables":{"1":"10:30"}}'
  end
  return '{"category":"APPOINTMENT","title":"Appointment Confirmed",'
    .. '"body":"Your appointment is confirmed for 10:30.",'
    .. '"recipients":[' .. recipient .. '],"channels":["' .. channel .. '"],'
    .. '"metadata":{"clinicId":"' .. clinic .. '","appointmentId":"appt-' .. i .. '"}'
    .. extra .. '}'
end

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } clinicomm_timespec;
  int clock_gettime(int clock, clinicomm_timespec *ts);
]]
local now = ffi.new("clinicomm_timespec")
local CLOCK_MONOTONIC = 1
local first_ms = nil
local scheduled = 0

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
end

-- Milliseconds until this thread's next request is due (0 when it is late).
function delay()
  local t = now_ms()
  if first_ms == nil then
    first_ms = t
  end
  local due = first_ms + scheduled * interval_ms
  scheduled = scheduled + 1
  if due <= t then
    return 0
  end
  return math.floor(due - t)
end

function request()
  counter = counter + 1
  local i = counter * nthreads + tid
  local clinic = clinics[(i % #clinics) + 1]
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "wrk-" .. run .. "-" .. i,
  }
  return wrk.format("POST", "/api/v1/communications", headers, body(i, clinic))
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for k, v in pairs(s) do
      counts[k] = (counts[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(counts) do
    parts[#parts + 1] = '"' .. k .. '":' .. v
  end
  local e = summary.errors
  io.write(string.format(
    'CLINICOMM_WRK {"requests":%d,"duration_us":%d,"statuses":{%s},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
