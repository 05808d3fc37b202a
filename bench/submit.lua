-- wrk script: POST /orders with 100 pre-built valid orders in rotation (100 SKUs, priorities 0-9).
-- Prints one line "WRK {json}" with the figures the benchmark reads. The API key comes from
-- ORDERS_API_KEY.
local prepared = {}
local i = 0

function init(args)
  for n = 0, 99 do
    local body = string.format(
      '{"customer_id":"bench","items":[{"sku":"SKU-%d","quantity":1}],"priority":%d}', n, n % 10)
    local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = os.getenv("ORDERS_API_KEY")}
    prepared[n] = wrk.format("POST", "/orders", headers, body)
  end
end

function request()
  i = (i + 1) % 100
  return prepared[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
