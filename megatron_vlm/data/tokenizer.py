"""Text tokenizer wrapper: a HF `tokenizers` tokenizer plus the VLM's special tokens.

Loads either a ``tokenizer.json`` file or a tokenizer directory (``tokenizer.json`` and an
optional HF ``tokenizer_config.json`` naming ``eos_token`` / ``pad_token`` / ``bos_token``).
That covers Nemotron's released tokenizer (eos ``<SPECIAL_12>``, pad ``<unk>`` as in
Megatron-LM's ``nemotron-nano-v2`` prompt config) and the small byte-level BPE that
``megatron_vlm.data_prep.train_tokenizer`` trains for the demo corpus.

Tokens the VLM needs are added as special tokens when the vocabulary lacks them, as Megatron-LM
does: ``<img> </img> <image>`` (image start/end/context) and ``<quad> </quad> <ref> </ref> <box>
</box>`` (grounding). Chat-template markers (``<SPECIAL_10>``, ``<SPECIAL_11>``, ``<SPECIAL_12>``)
are expected in the vocabulary (Nemotron has them; the demo BPE is trained with them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

IMG_START = "<img>"
IMG_END = "</img>"
IMAGE_CONTEXT = "<image>"
GROUNDING_TOKENS = ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
VLM_SPECIAL_TOKENS = (IMAGE_CONTEXT, IMG_START, IMG_END) + GROUNDING_TOKENS

# Nemotron Nano V2 chat markers: system header, user/assistant header, end of turn (= eos).
SYSTEM_MARKER = "<SPECIAL_10>"
TURN_MARKER = "<SPECIAL_11>"
END_OF_TURN = "<SPECIAL_12>"
THINK_START = "<think>"
THINK_END = "</think>"
CHAT_MARKERS = (SYSTEM_MARKER, TURN_MARKER, END_OF_TURN)

DEFAULT_EOS = END_OF_TURN
DEFAULT_PAD = "<unk>"


def _token_content(value) -> str | None:
    """HF configs store a token as a string or as {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    raise ValueError(f"cannot read a token from {value!r}")


class VLMTokenizer:
    """Encode/decode text; knows the ids of the special tokens the data pipeline uses."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = DEFAULT_EOS, pad_token: str | None = DEFAULT_PAD,
                 bos_token: str | None = None):
        self._tok = tokenizer
        missing = [t for t in VLM_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        if tokenizer.token_to_id(eos_token) is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        if pad_token is None or tokenizer.token_to_id(pad_token) is None:
            pad_token = eos_token  # padding is never a target, any id works
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.eos_id = tokenizer.token_to_id(eos_token)
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.img_start_id = tokenizer.token_to_id(IMG_START)
        self.img_end_id = tokenizer.token_to_id(IMG_END)
        self.image_id = tokenizer.token_to_id(IMAGE_CONTEXT)
        self.added_tokens = tuple(missing)

    # ---- loading / saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, eos_token: str | None = None,
                        pad_token: str | None = None) -> "VLMTokenizer":
        """Load a tokenizer.json file, or a directory holding tokenizer.json (+ tokenizer_config.json)."""
        path = Path(path)
        config: dict = {}
        if path.is_dir():
            cfg_path = path / "tokenizer_config.json"
            if cfg_path.exists():
                config = json.loads(cfg_path.read_text())
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = Tokenizer.from_file(str(path))
        eos = eos_token or _token_content(config.get("eos_token")) or DEFAULT_EOS
        pad = pad_token or _token_content(config.get("pad_token")) or DEFAULT_PAD
        bos = _token_content(config.get("bos_token"))
        return cls(tok, eos_token=eos, pad_token=pad, bos_token=bos)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and an HF-style tokenizer_config.json (loadable by AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ---- encoding ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids in use (added tokens included); the model pads it up as it likes."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (special-token strings in text are matched)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> Tokenizer:
        return self._tok


def token_ids(tokenizer: VLMTokenizer) -> dict:
    """The ids an export needs of the tokenizer (also stored in self-describing checkpoints)."""
    return {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "image_id": tokenizer.image_id}
