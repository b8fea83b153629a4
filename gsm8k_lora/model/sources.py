"""Where a model's weights come from: the hub, a local directory, a GGUF file, or a GGUF shipped
inside a PyPI wheel (for machines that reach PyPI but not the hub).

Every GGUF is converted once into an ordinary float32 model directory in the package's cache and
then loaded like any local model: transformers' GGUF loader dequantises on every load and takes
tens of seconds converting the tokenizer, and a GGUF-loaded model refuses `save_pretrained`.
A converted model is NOT bit-identical to the hub original: its weights went through the GGUF's
quantisation (Q4_1 for SmolLM2-135M-Instruct from PyPI). `Resolved.description` says so, and
`environment.json` and the report carry it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from gsm8k_lora import hub
from gsm8k_lora.config import BUILTIN_FALCON3_SHAPE, BUILTIN_TINY, ModelConfig
from gsm8k_lora.errors import ConfigError, ModelLoadError
from gsm8k_lora.model import cache, shaped, tiny

CONVERT_VERSION = 1  # bump when the conversion below changes, so old caches are not reused
MARKER = "gsm8k_lora_gguf.json"  # written last into a converted directory: its presence means complete


@dataclass(frozen=True)
class Resolved:
    path: str  # what `from_pretrained` gets: a hub id or a local directory
    source: str  # builtin | hub | local | gguf | pypi
    description: str  # one line for environment.json and the report: which weights, exactly

    def as_dict(self) -> dict:
        return asdict(self)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_pypi_gguf(cfg: ModelConfig, root: Path) -> Path:
    """The GGUF inside the pinned PyPI wheel, fetched once (wheel only: its dependencies are not
    needed to read one file) and checked against the pinned sha256."""
    spec = cfg.pypi
    target = root / "pypi" / f"{spec.package}-{spec.version}" / Path(spec.gguf_member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"model: fetching {spec.package}=={spec.version} from PyPI (the wheel alone, --no-deps)")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--dest", tmp, f"{spec.package}=={spec.version}"], stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(f"cannot fetch {spec.package}=={spec.version} from PyPI with pip ({last}); "
                                 f"give a local model with model.name_or_path=DIR, or model.source=hub")
        got = sha256(wheels[0])
        if got != spec.sha256:
            raise ModelLoadError(f"{wheels[0].name}: sha256 {got} does not match the pinned model.pypi.sha256 "
                                 f"{spec.sha256}; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if spec.gguf_member not in wheel.namelist():
                raise ModelLoadError(f"{wheels[0].name} has no {spec.gguf_member!r} (model.pypi.gguf_member)")
            info = wheel.getinfo(spec.gguf_member)
            partial = Path(tmp) / target.name
            with wheel.open(info) as src, partial.open("wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"Extracting {target.name}") as bar:
                for block in iter(lambda: src.read(1 << 22), b""):
                    dst.write(block)
                    bar.update(len(block))
        partial.replace(target)  # atomic: a half-extracted file is never seen under `target`
    return target


def convert_gguf(gguf: Path, root: Path, setting: str | None = None) -> Path:
    """A float32 model directory made once from `gguf`, keyed by the file's content; `setting` is the
    config key that asked for it, named if the file cannot be read."""
    digest = sha256(gguf)
    target = root / "gguf" / f"{gguf.stem}-{digest[:12]}-v{CONVERT_VERSION}"
    if (target / MARKER).exists():
        return target
    print(f"model: converting {gguf.name} to a float32 model directory (once; cached in {target.parent})")

    def convert(staging: Path) -> None:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         use_kernels=False)  # see model/kernels.py
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, NotImplementedError, KeyError, RuntimeError) as err:
            label = setting or f"model.gguf_file={str(gguf)!r}"
            raise ModelLoadError(f"{label}: transformers' GGUF loader cannot read it "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); it supports "
                                 f"the architectures and quantisations listed in transformers' GGUF docs") from err
        # The GGUF quantizer marker makes save_pretrained refuse; the weights are plain float32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": digest}) + "\n")

    return cache.build_once(target, MARKER, convert)


def _local_gguf(cfg: ModelConfig) -> Path:
    """`model.gguf_file` as a path, or as a file name inside the directory `model.name_or_path`."""
    given = Path(cfg.gguf_file).expanduser()
    inside = Path(cfg.name_or_path).expanduser() / given
    for path in (given, inside):
        if path.is_file():
            return path
    raise ConfigError(f"model.gguf_file={cfg.gguf_file!r} is invalid: no such file, nor {str(inside)!r}; give a .gguf "
                      f"file path, or a file name inside the directory model.name_or_path")


def resolve(cfg: ModelConfig, cache_dir: str | None = None) -> Resolved:
    """Which weights a run loads, fetched or converted first where needed."""
    root = cache.root(cache_dir)
    if cfg.gguf_file:
        gguf = _local_gguf(cfg)
        return Resolved(str(convert_gguf(gguf, root)), "gguf",
                        f"{gguf.name}, dequantised to float32 (not bit-identical to unquantised weights)")
    if cfg.name_or_path == BUILTIN_TINY:
        path = tiny.ensure(cfg.tiny_seed, root)
        return Resolved(str(path), "builtin", f"the package's built-in tiny model (seed {cfg.tiny_seed})")
    if cfg.name_or_path == BUILTIN_FALCON3_SHAPE:
        return Resolved(str(shaped.ensure(root)), "builtin", "Falcon3-1B-Instruct's architecture with random weights "
                        "and the tiny model's tokenizer: for speed and memory only, its answers mean nothing")
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        return Resolved(str(local), "local", f"local directory {cfg.name_or_path}")
    from_hub = Resolved(cfg.name_or_path, "hub", f"{cfg.name_or_path} from the Hugging Face hub "
                                                 f"(revision {cfg.revision or 'main'})")
    if cfg.source == "hub":
        hub.probe()  # offline: later lookups fail at once, or find the local cache
        return from_hub
    if cfg.source == "auto" and (hub.probe() or hub.model_in_cache(cfg.name_or_path, cfg.revision)):
        return from_hub
    spec = cfg.pypi
    if cfg.source == "auto":
        print(f"model: {cfg.name_or_path} is not reachable on the hub; using its copy in the PyPI package "
              f"{spec.package}=={spec.version}")
    gguf = fetch_pypi_gguf(cfg, root)
    converted = convert_gguf(gguf, root, f"model.pypi: {gguf.name} from {spec.package}=={spec.version}")
    return Resolved(str(converted), "pypi",
                    f"{cfg.name_or_path} as {gguf.name} from PyPI {spec.package}=={spec.version}, dequantised to "
                    f"float32: not bit-identical to the hub original")
