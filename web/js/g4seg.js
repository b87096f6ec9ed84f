// ComfyUI-G4Seg page extension.
//
// Old saved workflows of "Load Coarse Mask (G4Seg)": the shipped workflows before this fix stored
// the upload button's value ("image") right after the file name, as for LoadImage. The page never
// saves that button (serialize: false) and skips it when loading, so every later value landed one
// widget off (mask_kind = "image", soften_width = "sdf"). "image" is never a valid mask_kind, so a
// value list with "image" in second place is the old layout: drop it before the page reads it.
import { app } from "../../../scripts/app.js";

const UPLOAD_BUTTON_VALUE = "image";

export function migrateLoadCoarseMaskValues(values) {
  if (Array.isArray(values) && values.length >= 2 && values[1] === UPLOAD_BUTTON_VALUE) {
    values.splice(1, 1);
    return true;
  }
  return false;
}

app.registerExtension({
  name: "G4Seg.LoadCoarseMaskOldLayout",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "G4SegLoadCoarseMask") return;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      if (migrateLoadCoarseMaskValues(info?.widgets_values)) {
        console.info(`G4Seg: node ${info.id} (Load Coarse Mask) had the old widget layout; values moved into place`);
      }
      return configure.apply(this, arguments);
    };
  },
});
