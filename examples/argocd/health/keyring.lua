-- Argo CD health of a kustody.io KeyRing (resource.customizations.health.kustody.io_KeyRing).
-- Healthy: Ready=True for the current generation. Progressing: not yet observed, rotating,
-- deleting. Degraded: Ready=False for any other reason (HSMUnavailable, KeyMaterialMissing,
-- FingerprintMismatch, RotationPolicyNotFound, ...) - the message says why.
local hs = {status = "Progressing", message = "Waiting for the Kustody operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local ready, rotating = nil, nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then ready = c end
  if c.type == "Rotating" then rotating = c end
end
if ready == nil or ready.status == "Unknown" then
  return hs
end
if ready.status == "True" then
  if rotating ~= nil and rotating.status == "True" then
    hs.status = "Progressing"
    hs.message = rotating.reason .. ": " .. (rotating.message or "")
    return hs
  end
  hs.status = "Healthy"
  hs.message = "primary version " .. tostring(obj.status.primaryVersion or "-") .. ": " .. (ready.message or "")
  return hs
end
if ready.reason == "Deleting" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = ready.reason .. ": " .. (ready.message or "")
return hs
