-- etcd v3 JSON gateway: POST /v3/kv/range for one key, over the keys the write phase left.
local counter = 0
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
local keys = {}
for i = 0, 999 do keys[i] = b64("bench/" .. i) end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
    counter = counter + 1
    return wrk.format(nil, "/v3/kv/range", nil, '{"key":"' .. keys[counter % 1000] .. '"}')
end
