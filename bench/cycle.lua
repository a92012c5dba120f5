-- wrk script: cycle through the request paths listed, one a line, in the file
-- named by the BENCH_URLS environment variable.
local paths = {}
for line in io.lines(os.getenv("BENCH_URLS")) do
  if #line > 0 then
    paths[#paths + 1] = line
  end
end
if #paths == 0 then
  error("BENCH_URLS lists no paths")
end

local index = 0

request = function()
  index = index % #paths + 1
  return wrk.format("GET", paths[index])
end
