-- wrk script of bench/load/single.py and bench/affinity/run.py: POST each line's path and JSON body
-- of a request file ("<path>\t<body>" per line), in order, wrapping around at the end. Each wrk
-- thread keeps its own position.
local paths, bodies = {}, {}
local next_index = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  for line in io.lines(args[1]) do
    local path, body = line:match("^(%S+)\t(.*)$")
    paths[#paths + 1] = path
    bodies[#bodies + 1] = body
  end
end

function request()
  next_index = next_index % #paths + 1
  return wrk.format("POST", paths[next_index], headers, bodies[next_index])
end
