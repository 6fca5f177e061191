-- Argo CD health of a kustody.io DataKey (resource.customizations.health.kustody.io_DataKey).
-- Healthy: Ready=True (reason KeyAvailable) for the current generation. Degraded: Ready=False
-- (KeyRingNotFound, KeyRingNotReady, NamespaceNotAllowed, PlaintextExportNotAllowed,
-- SecretConflict, HSMUnavailable, InvalidSpec) with the operator's message. Progressing
-- otherwise, including KeyRingDeleting.
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
      local secret = ""
      if obj.status.secretRef ~= nil and obj.status.secretRef.name ~= nil then
        secret = " in Secret " .. obj.status.secretRef.name
      end
      hs.message = "key version " .. tostring(obj.status.keyRingVersion or "-") .. secret
    elseif c.status == "False" then
      if c.reason == "KeyRingDeleting" then
        hs.status = "Progressing"
      else
        hs.status = "Degraded"
      end
      hs.message = c.reason .. ": " .. (c.message or "")
    end
    return hs
  end
end
return hs
