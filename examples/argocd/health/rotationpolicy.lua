-- Argo CD health of a kustody.io RotationPolicy
-- (resource.customizations.health.kustody.io_RotationPolicy). Healthy when the operator has
-- validated the current generation (Ready=True), Degraded when it refused it (InvalidSpec).
local hs = {status = "Progressing", message = "Waiting for the Kustody operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    if c.status == "True" then
      hs.status = "Healthy"
      hs.message = (c.message or "") .. "; used by " .. tostring(obj.status.keyRings or 0) .. " KeyRing(s)"
    elseif c.status == "False" then
      hs.status = "Degraded"
      hs.message = c.reason .. ": " .. (c.message or "")
    end
    return hs
  end
end
return hs
