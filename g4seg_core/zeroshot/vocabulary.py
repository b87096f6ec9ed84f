"""Words for zero-shot segmentation: prompt templates, background words, the user's class list.

The 80 prompt templates are the ones OpenAI's CLIP used for ImageNet zero-shot classification
(the tests check them against open_clip's copy); the background words are the stuff classes that
SCLIP / NACLIP query as background on PASCAL VOC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ..errors import G4SegError

IMAGENET_TEMPLATES: Tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "imagenet80": IMAGENET_TEMPLATES,  # the recipe (SPEC): 80 templates averaged
    "single": ("a photo of a {}.",),  # 80x less text encoding: for a quick look on a CPU
}

# Stuff words queried as background (PASCAL VOC setting of SCLIP / NACLIP).
STUFF_WORDS: Tuple[str, ...] = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor",
    "hill", "rail", "fence",
)
SYNONYM_SEPARATOR = "|"
# `--classes voc`: the 20 PASCAL VOC classes in VOC order (labels 1..20 = VOC indices), written as words
# with a few synonyms of our choosing (the first name of each is what files are named after).
VOC_CLASS_LIST = ("aeroplane|airplane, bicycle, bird, boat|ship, bottle, bus, car, cat, chair, cow, "
                  "dining table|table, dog, horse, motorbike|motorcycle, person, potted plant, sheep, sofa|couch, "
                  "train, tv monitor|television")
CLASS_LIST_SHORTCUTS = {"voc": VOC_CLASS_LIST}


BACKGROUND_NAME = "background"  # label 0's name in reports (label_fractions) and label-map PNGs


def _norm(word: str) -> str:
    return " ".join(word.strip().lower().split())


def template_set(name: str) -> Tuple[str, ...]:
    if name not in TEMPLATE_SETS:
        raise G4SegError(f"templates {name!r}: choose one of {sorted(TEMPLATE_SETS)} "
                         "('imagenet80' is the published recipe)")
    return TEMPLATE_SETS[name]


def parse_background_words(value) -> Tuple[str, ...]:
    """'voc' (the 26 stuff words), 'none', or a comma-separated list of words (a string or a sequence)."""
    if value is None:
        return ()
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("voc", "stuff", "default"):
            return STUFF_WORDS
        if key in ("", "none", "off"):
            return ()
        value = value.replace("\n", ",").split(",")
    words = [_norm(w) for w in value if _norm(w)]
    if not words:
        return ()
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class ClassList:
    """The user's classes (label k+1 = classes[k]) with their synonyms, and the background words kept.

    queries: every text that is encoded, each with the label it counts for (0 = background).
    dropped_background: background words that were dropped because the user listed them as a class.
    """

    classes: Tuple[str, ...]  # display name of each class (its first synonym)
    synonyms: Tuple[Tuple[str, ...], ...]
    background: Tuple[str, ...]
    dropped_background: Tuple[str, ...] = ()

    @property
    def queries(self) -> List[Tuple[str, int]]:
        out = [(name, k + 1) for k, names in enumerate(self.synonyms) for name in names]
        return out + [(word, 0) for word in self.background]


def parse_classes(text: str, background="voc") -> ClassList:
    """'cat, sofa|couch, person' -> ClassList; commas or new lines separate classes, '|' synonyms.

    'voc' stands for the 20 PASCAL VOC classes in VOC order (VOC_CLASS_LIST).

    Errors: an empty list, an empty synonym, a name given twice (in one class or across classes),
    more than 254 classes (label maps are 8-bit: 0 is background, 255 is "ignore" in VOC). A class that is
    also a background word is dropped from the background words (and reported in `dropped_background`).
    """
    if not isinstance(text, str):
        raise G4SegError(f"the class list must be a string like 'cat, sofa, person', got {type(text).__name__}")
    text = CLASS_LIST_SHORTCUTS.get(text.strip().lower(), text)
    items = [item for item in text.replace("\n", ",").split(",") if item.strip()]
    if not items:
        raise G4SegError("the class list is empty: give the names to segment, e.g. 'cat, sofa, person' "
                         "(synonyms of one class with '|': 'sofa|couch')")
    synonyms, seen = [], {}
    for item in items:
        names = [_norm(n) for n in item.split(SYNONYM_SEPARATOR)]
        if any(not n for n in names):
            raise G4SegError(f"class {item.strip()!r} has an empty synonym: write 'sofa|couch', not 'sofa|'")
        for name in names:
            if name == BACKGROUND_NAME:
                raise G4SegError(f"'{BACKGROUND_NAME}' names label 0 (what no class covers), so it cannot be a class: "
                                 "name the class something else (e.g. 'backdrop'), or set the background words "
                                 "instead (--background / the background input)")
            if name in seen:
                raise G4SegError(f"{name!r} is listed twice (classes {seen[name]!r} and {item.strip()!r}): "
                                 "give each name once; join synonyms of one class with '|'")
            seen[name] = item.strip()
        synonyms.append(tuple(names))
    if len(synonyms) > 254:
        raise G4SegError(f"{len(synonyms)} classes: at most 254 fit in an 8-bit label map (0 is background)")
    words = parse_background_words(background)
    dropped = tuple(w for w in words if w in seen)
    return ClassList(classes=tuple(names[0] for names in synonyms), synonyms=tuple(synonyms),
                     background=tuple(w for w in words if w not in seen), dropped_background=dropped)
