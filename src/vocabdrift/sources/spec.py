"""What the user named as a model: THE parser for folder | file | .gguf | hub id, and the loading policy.

Every command that takes a model (`diff`, `vocab`, `neighbors`, `check`, `coverage --tokenizer`, `synth`, `probe`,
`cases`, `undertrained`, `confusion`, `repair`) goes through `parse_model_spec`, so a spec means the same thing
everywhere: `~` is expanded, an existing path is a path, and only a name that cannot be a path is a hub id.

The policy lives here too, in one place:
- pickle weights (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused unless the caller opts in (`allow_pickle`): loading a
  pickle can run code;
- `trust_remote_code` is off unless asked (callers pass it through; nothing here turns it on);
- a hub id (`org/name`, never a bare name: a mistyped folder must not become a request) is looked up on the hub,
  which is asked once and quickly first (`sources.hub`), so an unreachable hub is one clear error in seconds; with
  `HF_HUB_OFFLINE=1` nothing is asked and the `huggingface_hub` client answers from its local cache only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import VocabdriftError
from .hub import require_hub, valid_hub_id

SpecKind = Literal["folder", "file", "gguf", "hub"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        raw: what the user wrote.
        kind: "folder", "file" (a weights or tokenizer file other than .gguf), "gguf" (a .gguf file) or "hub".
        path: the expanded local path (None for a hub id).
        hub_id: the repository id (None for a local path).
    """

    raw: str
    kind: SpecKind
    path: Path | None = None
    hub_id: str | None = None

    @property
    def local(self) -> bool:
        return self.path is not None

    @property
    def folder(self) -> Path | None:
        """The folder that holds the model's files (config, tokenizer): the folder itself, or a file's parent."""
        if self.path is None:
            return None
        return self.path if self.kind == "folder" else self.path.parent

    @property
    def name(self) -> str:
        """A short label: a folder's name, a file's stem, a hub id as written."""
        if self.path is None:
            return self.raw
        return (self.path.stem if self.kind != "folder" else self.path.name) or self.raw

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.raw

    # ---- where the libraries should look ------------------------------------------------------------------
    def tokenizer_source(self) -> str | Path:
        """What a tokenizer loader takes for this model: a folder, a tokenizer .json, a .gguf file, or a hub id.

        A weights file (`model.safetensors`, `pytorch_model.bin`) stands for the folder it is in."""
        if self.path is None:
            return self.raw
        if self.kind == "file" and self.path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            return self.path.parent
        return self.path

    def pretrained_source(self) -> tuple[str, str | None]:
        """(folder or hub id, .gguf file name or None): the arguments of `from_pretrained`."""
        if self.path is None:
            return self.raw, None
        if self.kind == "gguf":
            return str(self.path.parent), self.path.name
        if self.kind == "file":
            return str(self.path.parent), None
        if not (self.path / "config.json").exists():
            ggufs = sorted(self.path.glob("*.gguf"))
            if ggufs:
                return str(self.path), ggufs[0].name
            raise VocabdriftError(f"{self.path}: no config.json or .gguf here; pass a Hugging Face model folder or "
                                  "a .gguf file")
        return str(self.path), None


def looks_like_hub_id(text: str) -> bool:
    """`org/name` made of the characters hub ids allow: not a relative path (`./x`, `x/y/z`), not a bare name (a
    mistyped folder must not send a request to the hub), not a file name (`model.safetensors`)."""
    return (bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith(".")
            and not text.endswith(WEIGHT_SUFFIXES + (".json",)) and valid_hub_id(text))  # `org/..` is not one


def parse_model_spec(spec: str | os.PathLike | ModelSpec) -> ModelSpec:
    """Parse what the user named as a model (or tokenizer).

    An existing path (after `~` is expanded) is a folder, a .gguf file or another file; a name that cannot be a
    path (`org/name`) is a hub id; anything else is "no such file or folder".

    Example:
        >>> parse_model_spec("~/models/qwen").kind
        'folder'
    """
    if isinstance(spec, ModelSpec):
        return spec
    raw = os.fspath(spec)
    if not raw.strip():
        raise VocabdriftError("an empty model name; pass a model folder, a weights file, a .gguf file or a hub id")
    p = Path(raw).expanduser()
    if p.is_dir():
        _only_regular_files(p)
        return ModelSpec(raw, "folder", p)
    if p.is_file():
        return ModelSpec(raw, "gguf" if p.suffix == ".gguf" else "file", p)
    if p.exists():  # a pipe, a socket, a device: reading it could block forever
        raise VocabdriftError(f"{raw}: not a regular file (a pipe, socket or device); pass a model folder or a "
                              "weights file")
    if not isinstance(spec, Path) and not os.path.isabs(raw) and not raw.startswith("~") and looks_like_hub_id(raw):
        require_hub(raw)  # seconds, not a minute of retries, when the hub does not answer (sources.hub)
        return ModelSpec(raw, "hub", hub_id=raw)
    raise VocabdriftError(f"{raw}: no such file or folder")


_MODEL_FILES = (".json", ".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".model", ".txt", ".jinja")


def _only_regular_files(folder: Path) -> None:
    """A model folder's files that vocabdrift or transformers may open (config, tokenizer, weights, indexes) must
    be regular files: a FIFO named model.safetensors would block the first read forever."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise VocabdriftError(f"{folder}: cannot be listed ({e.strerror or e})") from e
    for f in entries:
        if f.suffix in _MODEL_FILES and f.exists() and not f.is_file() and not f.is_dir():
            raise VocabdriftError(f"{f}: not a regular file (a pipe, socket or device); a model folder holds files "
                                  "— replace it with the file it stands for")


# ---- the loading policy ----------------------------------------------------------------------------------------

def pickle_refused(where: str | os.PathLike) -> VocabdriftError:
    """The one message for a refused pickle: what it is, why, and the two ways forward."""
    return VocabdriftError(f"{where}: pickle weights can run code when loaded, so they are refused; convert them to "
                           "safetensors, or pass --allow-pickle (loaded with weights_only=True)")


def only_pickle_weights(folder: Path) -> bool:
    """A folder whose only weights are pickles (no .safetensors, no .gguf)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix in (".safetensors", ".gguf") for p in files):
        return False
    return any(p.suffix in PICKLE_SUFFIXES for p in files)


def check_weights_policy(spec: ModelSpec, *, allow_pickle: bool) -> None:
    """Refuse a local model whose weights are pickles unless `allow_pickle`: before anything loads them."""
    if allow_pickle or spec.path is None:
        return
    if spec.kind == "file" and spec.path.suffix in PICKLE_SUFFIXES:
        raise pickle_refused(spec.path)
    if spec.kind == "folder" and only_pickle_weights(spec.path):
        raise pickle_refused(spec.path)


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).exists() for f in _TOKENIZER_FILES)
