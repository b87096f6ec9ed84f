"""CLIP BPE tokenizer for SD's text encoders, built offline from open_clip's vocabulary.

Every SD text encoder (OpenAI CLIP-L, OpenCLIP ViT-H and bigG) uses the same byte-level
BPE vocabulary of 49408 tokens. open_clip ships it as `bpe_simple_vocab_16e6.txt.gz`, so
no tokenizer files need to be downloaded. The file is read directly (without importing
open_clip, whose import costs seconds); the tests check the ids against open_clip's own
SimpleTokenizer and the start/end/padding conventions against diffusers' tokenizers.

Padding differs between encoders and matters (padded positions are attended to by the
UNet's cross-attention): OpenAI CLIP-L tokenizers (SD1.x, SDXL's first encoder) pad with
the end token 49407; the OpenCLIP tokenizers (SD2.x, SDXL's second encoder) pad with
id 0 ("!").
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

from ..errors import G4SegError

START_TOKEN = 49406
END_TOKEN = 49407
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
# The merges used by CLIP: the first line of the file is a header, then 49152 - 256 - 2 merges.
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> str:
    """Path of open_clip's installed `bpe_simple_vocab_16e6.txt.gz` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(path):
            return path
    raise G4SegError("the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found: "
                     "install open_clip_torch (pip install open_clip_torch), which ships it")


def _byte_alphabet() -> Dict[int, str]:
    """Reversible map byte -> printable unicode character (CLIP's byte-level BPE alphabet).

    Printable latin-1 bytes map to themselves; the others (control chars, space, ...) are
    moved to code points from 256 upward, in byte order. The order of this dict is the
    order of the first 256 vocabulary entries: printable bytes first, then the moved ones.
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
            + list(range(ord("\xae"), ord("\xff") + 1)))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _BPE:
    """Byte-level BPE over CLIP's merges; `encode(text) -> ids` with CLIP's text cleaning."""

    def __init__(self, path: str):
        import regex  # a dependency of open_clip and transformers' CLIP tokenizer

        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")[1:_NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_map = _byte_alphabet()
        base = list(self.byte_map.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {token: i for i, token in enumerate(vocab)}
        if len(self.ids) != VOCAB_SIZE or self.ids["<|startoftext|>"] != START_TOKEN:
            raise G4SegError(f"unexpected CLIP BPE vocabulary in {path} ({len(self.ids)} tokens, expected "
                             f"{VOCAB_SIZE}): reinstall open_clip_torch")
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        # CLIP's pre-tokenizer: contractions, letter runs, single digits, punctuation runs.
        self.pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.cache: Dict[str, Tuple[str, ...]] = {}

    @staticmethod
    def clean(text: str) -> str:
        """CLIP's cleaning: fix mojibake (ftfy when installed), unescape HTML, squeeze spaces, lower-case."""
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:  # ftfy only repairs broken unicode; plain text tokenizes the same
            pass
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def word_pieces(self, word: str) -> Tuple[str, ...]:
        """Merge the characters of one pre-token by merge rank until no known pair is left."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # the last symbol carries the end-of-word mark
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                rank = self.ranks.get((parts[i], parts[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = (parts[i], parts[i + 1]), rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        self.cache[word] = result
        return result

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        for token in self.pattern.findall(self.clean(text)):
            word = "".join(self.byte_map[b] for b in token.encode("utf-8"))
            out.extend(self.ids[piece] for piece in self.word_pieces(word))
        return out


@functools.lru_cache(maxsize=1)
def _shared_bpe() -> _BPE:
    return _BPE(bpe_vocab_path())


class G4SegTokenizer:
    """SD's CLIP tokenizer: `__call__(prompt) -> LongTensor [77]` (start, words, end, padding).

    `pad_token_id`: 49407 for OpenAI CLIP-L encoders (SD1.x, SDXL's first), 0 for OpenCLIP
    encoders (SD2.x, SDXL's second). Prompts longer than 77 tokens are an error rather than
    silently truncated: a truncated prompt can lose the class name that EMI needs.
    """

    start_token_id = START_TOKEN
    end_token_id = END_TOKEN
    model_max_length = CONTEXT_LENGTH

    def __init__(self, pad_token_id: int = END_TOKEN):
        if not 0 <= int(pad_token_id) < VOCAB_SIZE:
            raise G4SegError(f"pad_token_id={pad_token_id} is outside the CLIP vocabulary 0..{VOCAB_SIZE - 1}")
        self.pad_token_id = int(pad_token_id)

    def __repr__(self) -> str:
        return f"G4SegTokenizer(pad_token_id={self.pad_token_id})"

    def encode_words(self, text: str) -> List[int]:
        """Token ids of `text` without start/end tokens (used to find a class name in a prompt)."""
        if not isinstance(text, str):
            raise G4SegError(f"text to tokenize must be a string, got {type(text).__name__}")
        return _shared_bpe().encode(text)

    def prompt_ids(self, prompt: str) -> List[int]:
        """[start] + words + [end], unpadded; raises G4SegError past 77 tokens."""
        ids = [START_TOKEN] + self.encode_words(prompt) + [END_TOKEN]
        if len(ids) > CONTEXT_LENGTH:
            raise G4SegError(f"the prompt {prompt[:80]!r}{'...' if len(prompt) > 80 else ''} is {len(ids)} tokens "
                             f"long; CLIP text encoders take at most {CONTEXT_LENGTH} (including start and end): "
                             "shorten the prompt template or the class name")
        return ids

    def __call__(self, prompt: str, pad_token_id: Optional[int] = None):
        import torch

        ids = self.prompt_ids(prompt)
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        return torch.tensor(ids + [pad] * (CONTEXT_LENGTH - len(ids)), dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of a list of ids (start/end/padding 0 dropped); for messages and debugging."""
        bpe = _shared_bpe()
        inverse = {i: t for t, i in bpe.ids.items()}
        bytes_of = {c: b for b, c in bpe.byte_map.items()}
        pieces = "".join(inverse[int(i)] for i in ids if int(i) not in (START_TOKEN, END_TOKEN))
        out = bytearray()
        for word in pieces.split("</w>"):
            out.extend(bytes_of[c] for c in word)
            out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()
