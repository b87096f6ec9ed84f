"""ComfyUI node classes of ComfyUI-G4Seg (thin wrappers over g4seg_core).

Importing this package needs torch and g4seg_core but not ComfyUI: every `comfy` import
is inside a function, so tests can inspect the declarations without a ComfyUI install.
"""

from .correspondence_nodes import G4SegCLIPCorrespondence, G4SegMixForeground
from .densecrf_node import G4SegDenseCRF
from .inject_nodes import G4SegInjectAttention, G4SegOneStepDenoise
from .mask_nodes import G4SegLoadCoarseMask, G4SegMaskToSegPalette
from .refine_node import G4SegRefine
from .text_to_mask_node import G4SegRefineClasses, G4SegTextToMask

# Node ids are permanent (saved workflows refer to them).
NODE_CLASS_MAPPINGS = {
    "G4SegLoadCoarseMask": G4SegLoadCoarseMask,
    "G4SegInjectAttention": G4SegInjectAttention,
    "G4SegOneStepDenoise": G4SegOneStepDenoise,
    "G4SegCLIPCorrespondence": G4SegCLIPCorrespondence,
    "G4SegMixForeground": G4SegMixForeground,
    "G4SegRefine": G4SegRefine,
    "G4SegMaskToSegPalette": G4SegMaskToSegPalette,
    "G4SegDenseCRF": G4SegDenseCRF,
    "G4SegTextToMask": G4SegTextToMask,
    "G4SegRefineClasses": G4SegRefineClasses,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "G4SegLoadCoarseMask": "Load Coarse Mask (G4Seg)",
    "G4SegInjectAttention": "Inject Mask into Attention (G4Seg)",
    "G4SegOneStepDenoise": "One-Step Denoise (G4Seg)",
    "G4SegCLIPCorrespondence": "CLIP Correspondence (G4Seg)",
    "G4SegMixForeground": "Mix Foreground (G4Seg)",
    "G4SegRefine": "Refine Mask (G4Seg)",
    "G4SegMaskToSegPalette": "Mask to Seg Palette (G4Seg)",
    "G4SegDenseCRF": "DenseCRF (G4Seg)",
    "G4SegTextToMask": "Text to Mask (G4Seg)",
    "G4SegRefineClasses": "Refine Classes (G4Seg)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
