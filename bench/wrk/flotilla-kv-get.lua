-- GET /v1/kv/bench/<n> over the keys the write phase left behind.
local counter = 0
request = function()
    counter = counter + 1
    return wrk.format("GET", "/v1/kv/bench/" .. (counter % 1000))
end
