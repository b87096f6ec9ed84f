"""G4SegLoadCoarseMask and G4SegMaskToSegPalette."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from g4seg_core.files import image_files, mask_files
from g4seg_core.method import label_maps, softening
from g4seg_core.method import masks as core_masks
from g4seg_core.files import palettes as core_palettes
from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError

from .common import (CATEGORY, Progress, check_interrupt, image_batch, image_to_mask, intermediate_device,
                     knob_inputs, mask_batch, stack_masks)

MASK_KINDS = ("auto", "probability", "label_map")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".npy")
BACKGROUNDS = ("black", "ade20k-wall")


# --------------------------------------------------------------------------- files (lazy folder_paths)

def input_files() -> List[str]:
    try:
        import folder_paths
        base = folder_paths.get_input_directory()
    except Exception:
        return []
    if not os.path.isdir(base):
        return []
    return sorted(f for f in os.listdir(base)
                  if os.path.isfile(os.path.join(base, f)) and f.lower().endswith(IMAGE_EXTENSIONS))


def resolve_input(name: str) -> str:
    """The file a mask name refers to: a regular file inside ComfyUI's input (or temp) folder.

    Absolute paths, '..', links leading out, '[output]' files, folders and FIFOs (which would block
    the prompt worker) are G4SegErrors. Without ComfyUI (Python use, tests) the path is taken as given.
    """
    try:
        import folder_paths
    except ImportError:
        return name
    relative, base = folder_paths.annotated_filepath(name)
    roots = [os.path.realpath(folder_paths.get_input_directory()), os.path.realpath(folder_paths.get_temp_directory())]
    if os.path.isabs(relative) or ".." in relative.replace("\\", "/").split("/"):
        raise G4SegError(f"mask file {name!r}: give a file name inside ComfyUI's input folder (upload it), "
                         "not an absolute path or a path with '..'")
    path = os.path.realpath(os.path.join(base or folder_paths.get_input_directory(), relative))
    if not any(path == root or path.startswith(root + os.sep) for root in roots):
        raise G4SegError(f"mask file {name!r} is outside ComfyUI's input and temp folders: upload it to the "
                         "input folder")
    return image_files.check_regular_file(path, "mask")


def looks_like_label_map(path: str) -> bool:
    """Palette PNGs and colour (R != G != B) images are label maps; greyscale images are probabilities."""
    if path.lower().endswith(".npy"):
        arr = np.load(image_files.check_regular_file(path, "mask"), mmap_mode="r", allow_pickle=False)
        return np.issubdtype(arr.dtype, np.integer) and arr.size > 0 and int(arr.max()) > 1
    img = image_files.open_image(path, "mask")
    if img.mode in ("P", "PA"):
        return True
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))
    return False


def load_mask_file(path: str, mask_kind: str, class_choice: str) -> Tuple[np.ndarray, str]:
    if mask_kind not in MASK_KINDS:
        raise G4SegError(f"mask_kind {mask_kind!r}: choose one of {MASK_KINDS}")
    image_files.check_regular_file(path, "mask")
    label = mask_kind == "label_map" or (mask_kind == "auto" and looks_like_label_map(path))
    if label:
        if not (class_choice or "").strip():
            raise G4SegError("this mask is a label map: set class_index_or_name to the class to refine "
                             "(a VOC name such as 'cat' or an index 0..254 such as 8)")
        return label_maps.class_probability_from_file(path, class_choice)
    return mask_files.load_probability(path), "probability map"


def soften(prob: np.ndarray, mode: str, width: float) -> Tuple[torch.Tensor, str]:
    soft, desc = softening.soften_binary(prob, mode=mode, width=float(width))
    return torch.from_numpy(np.array(soft, dtype=np.float32, order="C")), desc  # a writable copy


def mask_image_sources(mask_image: torch.Tensor) -> List[Tuple[np.ndarray, str]]:
    """IMAGE -> one map per image: its luminance; with an alpha channel, the luminance over black
    (transparent pixels are background: a stroke painted on a transparent layer). A fully transparent
    image has nothing drawn on it and is refused, not read from the RGB hidden under alpha 0."""
    imgs = image_batch(mask_image, "mask_image")  # shape and emptiness checked; alpha dropped
    if mask_image.shape[-1] != 4:
        return [(image_to_mask(im).clamp(0, 1).cpu().numpy(), "IMAGE input (luminance)") for im in imgs]
    alphas = (mask_image[None] if mask_image.dim() == 3 else mask_image)[..., 3].float().clamp(0, 1)
    sources = []
    for i, (im, alpha) in enumerate(zip(imgs, alphas)):
        if not bool((alpha > 0).any()):
            which = f" [{i}]" if len(imgs) > 1 else ""
            raise G4SegError(f"mask_image{which} is fully transparent (alpha 0 everywhere): nothing is drawn on "
                             "it; connect an image with the mask painted on it, or the mask as a MASK input")
        sources.append(((image_to_mask(im) * alpha).clamp(0, 1).cpu().numpy(),
                        "IMAGE input (luminance over black: transparent pixels are background)"))
    return sources


def load_coarse_mask(image: str, mask_kind: str, class_index_or_name: str, soften_mode: str, soften_width: float,
                     mask: Optional[torch.Tensor] = None, mask_image: Optional[torch.Tensor] = None, size: int = 0):
    # the knobs' own checks; soften_width is in working-size pixels like everywhere (size 0: the mask's own)
    G4SegConfig.from_widgets({"soften": soften_mode, "soften_width": soften_width, "size": size})
    if mask is not None:
        sources = [(m.clamp(0, 1).cpu().numpy(), "MASK input") for m in mask_batch(mask)]
    elif mask_image is not None:
        sources = mask_image_sources(mask_image)
    else:
        if not image or image in ("", "(none)"):
            raise G4SegError("no mask: choose a file in the image list (upload one), or connect a MASK/IMAGE")
        prob, what = load_mask_file(resolve_input(image), mask_kind, class_index_or_name)
        sources = [(prob, f"{image}: {what}")]
    bar = Progress(len(sources))
    out, notes = [], []
    for prob, what in sources:
        check_interrupt()
        prob = core_masks.validate_probability(prob, name=what)
        soft, desc = soften(prob, soften_mode, soften_width * (max(prob.shape) / size if size else 1.0))
        out.append(soft)
        warning = softening.uniform_map_warning(prob)  # said, not silently refined to nothing
        notes.append(f"{what}; {desc}" + (f"; warning: {warning}" if warning else ""))
        bar.update(1)
    text = notes[0] if len(set(notes)) == 1 else "\n".join(f"[{i}] {n}" for i, n in enumerate(notes))
    return stack_masks(out), text


class G4SegLoadCoarseMask:
    DESCRIPTION = ("Load a coarse segmentation as a probability MASK: binary, soft 8/16-bit greyscale, or a "
                   "palette/colour label map (pick the class by VOC name or index). Binary masks are softened "
                   "(G4Seg only updates uncertain pixels). A connected MASK or IMAGE replaces the file.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MASK", "STRING")
    RETURN_NAMES = ("mask", "softening")
    OUTPUT_TOOLTIPS = ("Probability map [B, H, W] in [0, 1].", "How the mask was read and softened.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (input_files(), {"image_upload": True, "tooltip": "Mask file from ComfyUI's input folder (PNG 8/16-bit, palette PNG, JPG, .npy). Ignored when a mask or mask_image is connected."}),
            "mask_kind": (list(MASK_KINDS), {"default": "auto", "tooltip": "auto: palette/colour images are label maps, greyscale ones probabilities; or force one."}),
            "class_index_or_name": ("STRING", {"default": "", "tooltip": "For label maps: the class to refine, a VOC name ('cat', 'person') or an index (8). Ignored for probability maps."}),
            # size appended to required: new widgets of an upload node go there (tests/test_workflows.py)
            **knob_inputs("soften", "soften_width", "size", defaults={"size": 0}, tooltips={
                "soften": ("How binary masks become probabilities: sdf = sigmoid of the signed distance to the "
                           "boundary, blur = Gaussian blur, none = keep binary (then nothing is in the update band). "
                           "Soft masks are never changed."),
                "soften_width": ("Softening width in working-size pixels (see size; by default the mask's own "
                                 "pixels). sdf: ~0.12 -> ~0.88 across this distance; blur: sigma = width/2."),
                "size": ("The working size soften_width is measured in: set G4SegRefine's size (e.g. 512) to "
                         "soften exactly as G4SegRefine would; 0 (default, as before) takes the mask's own "
                         "resolution as the working size.")}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Use this MASK (batch allowed) instead of the file."}),
            "mask_image": ("IMAGE", {"tooltip": "Use this IMAGE's luminance as the mask instead of the file (with an alpha channel: over black, transparent pixels are background)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, image, *args, **kwargs):
        # size and modification time: never reads the file (large files, FIFOs)
        try:
            st = os.stat(resolve_input(image))
            return f"{image}:{st.st_size}:{st.st_mtime_ns}"
        except (G4SegError, OSError):
            return image

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if image in ("", "(none)"):
            return True
        try:
            resolve_input(image)
        except G4SegError as exc:
            return f"Invalid mask file: {exc}"
        return True

    def load(self, image, mask_kind, class_index_or_name, soften, soften_width, mask=None, mask_image=None, size=0):
        return load_coarse_mask(image, mask_kind, class_index_or_name, soften, soften_width, mask=mask,
                                mask_image=mask_image, size=size)


# --------------------------------------------------------------------------- seg palette

def mask_to_seg_palette(mask, class_name: str, threshold: float, background: str = "black") -> torch.Tensor:
    masks = mask_batch(mask)
    out = []
    for m in masks:
        arr = core_palettes.draw_seg_palette(m.cpu().numpy(), class_name, threshold=float(threshold),
                                             background=background)
        out.append(torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0)
    return torch.stack(out).to(intermediate_device())


class G4SegMaskToSegPalette:
    DESCRIPTION = ("Draw the mask in the ADE20K segmentation palette (the class's ADE20K colour) for a "
                   "segmentation ControlNet (ControlNetApplyAdvanced): the paper's ControlNet-seg variant of "
                   "mask injection.")
    CATEGORY = CATEGORY
    FUNCTION = "draw"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("seg_image",)
    OUTPUT_TOOLTIPS = ("ADE20K-palette image for a seg ControlNet.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK", {"tooltip": "Coarse mask (probabilities are thresholded)."}),
            "class_name": ("STRING", {"default": "cat", "tooltip": "Class name (ADE20K name, VOC name or common alias); picks the palette colour."}),
            **knob_inputs("threshold", tooltips={"threshold": "Pixels with mask >= threshold are painted with the class colour."}),
            "background": (list(BACKGROUNDS), {"default": "black", "tooltip": "black: no class (the ControlNet generates freely there); ade20k-wall: paint the rest as wall."}),
        }}

    def draw(self, mask, class_name, threshold, background="black"):
        return (mask_to_seg_palette(mask, class_name, threshold, background),)
