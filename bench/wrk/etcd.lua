-- etcd v3 JSON gateway, the same load as Flotilla's KV scripts: ETCD_OP=put posts /v3/kv/put with
-- VALUE_BYTES-byte values over 10,000 keys; ETCD_OP=range reads one key at a time over the first
-- 1,000. Keys and values are base64, as the gateway wants them.
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(data)
    return ((data:gsub(".", function(x)
        local r, b = "", x:byte()
        for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
        return r
    end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
        if #x < 6 then return "" end
        local c = 0
        for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
        return b64chars:sub(c + 1, c + 1)
    end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

local put = (os.getenv("ETCD_OP") or "put") == "put"
local spread = put and 10000 or 1000
local value = b64(string.rep("v", tonumber(os.getenv("VALUE_BYTES") or "128")))
local keys = {}
for i = 0, spread - 1 do keys[i] = b64("bench/" .. i) end
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
    counter = counter + 1
    local key = keys[counter % spread]
    if put then
        return wrk.format(nil, "/v3/kv/put", nil, '{"key":"' .. key .. '","value":"' .. value .. '"}')
    end
    return wrk.format(nil, "/v3/kv/range", nil, '{"key":"' .. key .. '"}')
end
