"""A model's files, read at the door before torch is imported, each by its format's own reader: JSON files by
`json`, safetensors headers by `safetensors.safe_open` (which also checks that the header covers the file), every
shard an index names, `tokenizer.json` by `tokenizers`, a GGUF header by `gguf`'s reader. The same for a LoRA
adapter and for the checkpoint a run resumes from. A broken file is one ModelLoadError naming it and what its reader
said; a missing file of a set (a shard, an adapter's weights) is named too. What only loading can find (a config
that transformers cannot build a model from, weights of other sizes than the config's, an adapter trained on another
base model, a chat template jinja cannot render) is said where the model loads (`loading.py`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from gsm8k_lora.errors import ModelLoadError

# transformers' order of preference: the first of these a directory holds is what it loads
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "added_tokens.json",
              "vocab.json")


def _said(err: BaseException) -> str:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: safetensors cannot read it ({_said(err)})") from err


def check_torch_file(path: Path) -> None:
    """A file `torch.save` wrote. Since torch 1.6 that is a zip archive whose directory sits at its end, so zipfile
    (the archive format's own reader) finds one cut short or overwritten without torch, which the door does not
    import; an older pickle (its first byte 0x80) is left to torch."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        with path.open("rb") as handle:
            if handle.read(1) == b"\x80":
                return
        raise ModelLoadError(f"{path}: not a file torch.save wrote (zipfile: {err})") from err


def check_weights(path: Path) -> None:
    (check_safetensors if path.suffix == ".safetensors" else check_torch_file)(path)


def weight_files(root: Path) -> list[Path]:
    """The weight files transformers would load from `root`: the first of `WEIGHTS` it holds, an index standing for
    every shard it names (ModelLoadError where one is missing)."""
    first = next((root / name for name in WEIGHTS if (root / name).is_file()), None)
    if first is None or not first.name.endswith(".index.json"):
        return [first] if first else []
    weight_map = json_object(first).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{first}: has no 'weight_map' of tensor names to shard files")
    shards = sorted(set(map(str, weight_map.values())))
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise ModelLoadError(f"{root / missing[0]} is missing: {first.name} names it as a shard ({len(missing)} of "
                             f"{len(shards)} shards missing)")
    return [root / s for s in shards]


def check_tokenizer_files(root: Path) -> None:
    if (root / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for any bad file
            raise ModelLoadError(f"{root / 'tokenizer.json'}: the tokenizers library cannot read it "
                                 f"({_said(err)})") from err
    for name in JSON_FILES:
        if (root / name).is_file():
            json_object(root / name)
    if (root / "chat_template.jinja").is_file():
        template_text(root / "chat_template.jinja")


def template_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: not UTF-8 text ({err})") from err


def check_model_dir(root: Path) -> None:
    """A local model directory: config, weights (every shard), tokenizer files, chat template."""
    if (root / "config.json").is_file():
        json_object(root / "config.json")
    weights = weight_files(root)
    if not weights:
        raise ModelLoadError(f"{str(root)!r} is a directory but not a Hugging Face model: it has no weights "
                             f"({', '.join(WEIGHTS)})")
    for path in weights:
        check_weights(path)
    check_tokenizer_files(root)


def check_gguf(path: Path) -> None:
    from gguf import GGUFReader  # the package transformers reads GGUF with; 0.4 s to import, only for a GGUF

    try:
        GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise ModelLoadError(f"{path}: the gguf package cannot read it as GGUF ({_said(err)})") from err


def check_adapter(root: Path) -> None:
    """A LoRA adapter directory: its config and weights (PEFT's file names)."""
    json_object(root / "adapter_config.json")
    weights = next((root / name for name in ADAPTER_WEIGHTS if (root / name).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{root} has adapter_config.json but no adapter weights ({', '.join(ADAPTER_WEIGHTS)})")
    check_weights(weights)


def check_checkpoint(folder: Path) -> None:
    """The checkpoint a run resumes from: the Trainer's state, the adapter, and what torch.save wrote (optimizer,
    scheduler, random states)."""
    json_object(folder / "trainer_state.json")
    if (folder / "adapter_config.json").is_file():
        check_adapter(folder)
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        check_torch_file(path)
