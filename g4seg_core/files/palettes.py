"""Class names and colour palettes: PASCAL VOC (label maps) and ADE20K (seg ControlNets).

* ``VOC_CLASSES`` / ``voc_palette()`` / ``voc_class_index()``: the 21 PASCAL VOC 2012 classes
  (background first) and the standard VOC colour map (the bit-interleaving "bitget"
  map, 256 entries; index 255 is the "ignore" label, drawn (224, 224, 192)).
* ``ADE20K_CLASSES`` / ``ADE20K_PALETTE``: the 150 ADE20K SceneParsing classes, in the
  order and with the colours used by the ADE20K segmentation ControlNets (the
  UperNet/mmseg "ADE20KDataset" palette that lllyasviel/sd-controlnet-seg and
  control_v11p_sd15_seg were trained on). Index i here is ADE20K label i + 1 (label 0
  of the SceneParsing annotations is "other", not a class).
* ``ade20k_color_for(name)`` resolves an ADE20K class name, a VOC class name or a
  common alias to a colour; ``VOC_TO_ADE20K`` is the table used for the 20 VOC classes.
* ``draw_seg_palette(mask, class_name)`` draws a mask as a seg-ControlNet conditioning
  image (SPEC "Variants": ControlNet-seg injection).
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import G4SegError

# --------------------------------------------------------------------------- VOC

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# Common spellings of the VOC names (after normalisation: lower case, "_"/"-" -> " ").
VOC_ALIASES: Dict[str, str] = {
    "bg": "background",
    "airplane": "aeroplane",
    "plane": "aeroplane",
    "aircraft": "aeroplane",
    "bike": "bicycle",
    "motorcycle": "motorbike",
    "motor bike": "motorbike",
    "motor cycle": "motorbike",
    "dining table": "diningtable",
    "table": "diningtable",
    "potted plant": "pottedplant",
    "plant": "pottedplant",
    "houseplant": "pottedplant",
    "tv monitor": "tvmonitor",
    "tv": "tvmonitor",
    "monitor": "tvmonitor",
    "television": "tvmonitor",
    "couch": "sofa",
    "people": "person",
    "human": "person",
    "man": "person",
    "woman": "person",
    "ship": "boat",
}


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name).strip().lower())).strip()


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map: uint8 [256, 3] (entry 0 black, 255 = ignore).

    Bits 0/1/2 of the index go to the most significant free bit of R/G/B, then the
    index is shifted by 3 and the next bits fill the next lower bit.
    """
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def voc_class_index(name_or_index: Union[str, int]) -> int:
    """VOC class index (0..20) of a class name, alias or index; G4SegError if unknown."""
    if isinstance(name_or_index, (bool, np.bool_)):
        raise G4SegError(f"VOC class {name_or_index!r}: give a class name or an index 0..20")
    if isinstance(name_or_index, (int, np.integer)):
        idx = int(name_or_index)
        if 0 <= idx < len(VOC_CLASSES):
            return idx
        raise G4SegError(
            f"VOC class index {idx} is out of range: use 0..{len(VOC_CLASSES) - 1} "
            f"({', '.join(f'{i}={n}' for i, n in enumerate(VOC_CLASSES))})")
    raw = str(name_or_index).strip()
    if raw.isdigit():
        return voc_class_index(int(raw))
    # Separators (_ - space) only stand between words: 'potted-plant' is found, 'c-a-t' is not.
    text = _normalise(raw)
    if text in VOC_CLASSES:
        return VOC_CLASSES.index(text)
    if text in VOC_ALIASES:
        return VOC_CLASSES.index(VOC_ALIASES[text])
    raise G4SegError(
        f"{name_or_index!r} is not a PASCAL VOC class. Valid names: {', '.join(VOC_CLASSES)} "
        f"(aliases such as airplane, tv, motorcycle, couch are accepted), or an index 0..20.")


def parse_class_choice(text: Union[str, int]) -> int:
    """A label-map class typed by a user: an index 0..254 (any label map) or a VOC class name.

    '-1', '2.5', '8x', 'c-a-t' and 255 (the ignore label) are errors, never a guessed class.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, (bool, np.bool_)):
        raw = str(int(text))
    else:
        raw = str(text).strip()
    if not raw:
        raise G4SegError("no class given: use a class index 0..254 or a VOC name such as 'cat'")
    if raw.isdigit():
        idx = int(raw)
        if idx == 255:
            raise G4SegError("class 255 is the 'ignore' label, not a class: use an index 0..254")
        if idx > 254:
            raise G4SegError(f"class index {idx}: label maps hold class indices 0..254 (255 = ignore)")
        return idx
    if re.fullmatch(r"[+-]?[\d.eE+-]+", raw):
        raise G4SegError(f"class {raw!r}: a class index is a whole number 0..254 (or give a VOC name "
                         f"such as 'cat')")
    try:
        return voc_class_index(raw)
    except G4SegError:  # voc_class_index speaks of VOC's indices 0..20; here any label 0..254 is taken
        raise G4SegError(f"{raw!r} is not a PASCAL VOC class name ({', '.join(VOC_CLASSES)}; aliases such as "
                         "airplane, tv, couch are accepted): give one, or a class index 0..254") from None


# --------------------------------------------------------------------------- ADE20K

ADE20K_CLASSES: Tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# RGB colour of ADE20K_CLASSES[i] in the seg-ControlNet conditioning images.
ADE20K_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

# Closest ADE20K class for each VOC foreground class. ADE20K-150 has no separate
# animal species (they are all "animal", index 126) and no train: a train is drawn as
# "bus" (the nearest long multi-window passenger vehicle); "tvmonitor" is drawn as
# "television receiver"; "diningtable" as "table"; "pottedplant" as "plant";
# "motorbike" as "minibike" (the ADE20K class for motorcycles and scooters).
VOC_TO_ADE20K: Dict[str, str] = {
    "aeroplane": "airplane",
    "bicycle": "bicycle",
    "bird": "animal",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "animal",
    "chair": "chair",
    "cow": "animal",
    "diningtable": "table",
    "dog": "animal",
    "horse": "animal",
    "motorbike": "minibike",
    "person": "person",
    "pottedplant": "plant",
    "sheep": "animal",
    "sofa": "sofa",
    "train": "bus",
    "tvmonitor": "television receiver",
}

# Further names that are not ADE20K or VOC names (checked after both).
ADE20K_ALIASES: Dict[str, str] = {
    "tv": "television receiver",
    "television": "television receiver",
    "motorcycle": "minibike",
    "scooter": "minibike",
    "bike": "bicycle",
    "plane": "airplane",
    "aeroplane": "airplane",
    "window": "windowpane",
    "couch": "sofa",
    "people": "person",
    "human": "person",
    "man": "person",
    "woman": "person",
    "child": "person",
    "trash can": "ashcan",
    "garbage can": "ashcan",
    "toy": "plaything",
    "fridge": "refrigerator",
    "cup": "glass",
}
_ANIMALS = (
    "kitten", "puppy", "bear", "elephant", "zebra", "giraffe", "lion", "tiger", "monkey",
    "rabbit", "deer", "goat", "pig", "duck", "chicken", "fish", "mouse", "squirrel", "fox",
    "wolf", "camel", "penguin", "parrot", "owl", "lamb", "calf", "pony", "donkey",
)
for _a in _ANIMALS:
    ADE20K_ALIASES[_a] = "animal"

_ADE_INDEX = {name: i for i, name in enumerate(ADE20K_CLASSES)}


def ade20k_class_for(class_name: str) -> str:
    """The ADE20K class used to draw ``class_name`` (ADE20K name, VOC name or alias)."""
    text = _normalise(class_name)
    if text in _ADE_INDEX:
        return text
    if text.replace(" ", "") in VOC_TO_ADE20K:  # "dining table", "potted plant"
        return VOC_TO_ADE20K[text.replace(" ", "")]
    if text in ADE20K_ALIASES:
        return ADE20K_ALIASES[text]
    if text in VOC_ALIASES and VOC_ALIASES[text] in VOC_TO_ADE20K:
        return VOC_TO_ADE20K[VOC_ALIASES[text]]
    if len(text) > 2 and text.endswith("s"):  # simple plural: "cats"
        try:
            return ade20k_class_for(text[:-1])
        except G4SegError:
            pass
    raise G4SegError(
        f"no ADE20K segmentation colour for class {class_name!r}. Use one of the 150 ADE20K "
        f"class names (e.g. person, car, animal, chair, table, plant, bus, airplane), a PASCAL "
        f"VOC name, or give the colour explicitly (draw_seg_palette(..., color=(r, g, b))).")


def ade20k_color_for(class_name: str) -> Tuple[int, int, int]:
    """RGB colour of ``class_name`` in the ADE20K seg-ControlNet palette."""
    return ADE20K_PALETTE[_ADE_INDEX[ade20k_class_for(class_name)]]


def _background_color(background: Union[str, Sequence[int]]) -> Tuple[int, int, int]:
    if not isinstance(background, str):
        color = tuple(int(c) for c in background)
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise G4SegError(f"background={background!r}: give 3 integers 0..255 (r, g, b)")
        return color  # type: ignore[return-value]
    text = _normalise(background)
    if text == "black":
        return (0, 0, 0)
    if text == "white":
        return (255, 255, 255)
    if text.startswith("ade20k "):
        return ade20k_color_for(text[len("ade20k "):])
    raise G4SegError(
        f"background={background!r}: use 'black' (default: unlabelled), 'white', "
        f"'ade20k-<class>' such as 'ade20k-wall', or an (r, g, b) tuple")


def draw_seg_palette(
    prob_or_mask,
    class_name: Optional[str],
    threshold: float = 0.5,
    background: Union[str, Sequence[int]] = "black",
    color: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Draw a mask as an ADE20K seg-ControlNet conditioning image: uint8 [H, W, 3].

    Pixels with ``prob >= threshold`` get the ADE20K colour of ``class_name`` (or
    ``color`` when given); all other pixels get ``background``. The default background
    is black: black is no ADE20K class (the annotators leave "other" pixels black), so
    the ControlNet is told only where the object is and generates free content
    elsewhere, like the attention-injection variant. ``"ade20k-wall"`` (or any
    ``"ade20k-<class>"``) paints the background as that class instead.
    """
    prob = np.asarray(prob_or_mask)
    if prob.ndim != 2:
        raise G4SegError(f"mask has shape {tuple(prob.shape)}: pass a single [H, W] map")
    if not 0.0 < float(threshold) < 1.0 and prob.dtype != bool:
        raise G4SegError(f"threshold={threshold}: use a value strictly between 0 and 1")
    if color is not None:
        fg = tuple(int(c) for c in color)
        if len(fg) != 3 or not all(0 <= c <= 255 for c in fg):
            raise G4SegError(f"color={color!r}: give 3 integers 0..255 (r, g, b)")
    else:
        if class_name is None:
            raise G4SegError("draw_seg_palette needs a class_name or an explicit color=(r, g, b)")
        fg = ade20k_color_for(class_name)
    bg = _background_color(background)
    if prob.dtype == bool:
        inside = prob
    else:
        inside = np.nan_to_num(prob.astype(np.float32), nan=0.0) >= float(threshold)
    out = np.empty(prob.shape + (3,), dtype=np.uint8)
    out[...] = np.asarray(bg, dtype=np.uint8)
    out[inside] = np.asarray(fg, dtype=np.uint8)
    return out
