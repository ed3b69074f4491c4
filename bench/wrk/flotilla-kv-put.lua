-- PUT /v1/kv/bench/<n> with a fixed-size value; keys rotate so writes do not pile on one row.
local counter = 0
local value = string.rep("v", tonumber(os.getenv("VALUE_BYTES") or "128"))
request = function()
    counter = counter + 1
    return wrk.format("PUT", "/v1/kv/bench/" .. (counter % 10000), nil, value)
end
