-- wrk script of the clinicomm bench (bench/load.py runs it): POST /api/v1/communications with
-- a body and an Idempotency-Key of its own on every request, clinics round robin.
--
-- wrk -t T -c C -d Ds -s bench/wrk_post.lua URL -- <run> <channel> <token> <threads> <clinic>...
-- done() prints one line "CLINICOMM_WRK <json>": requests, status counts, errors, latency.

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
  clinics = {}
  for i = 5, #args do
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
