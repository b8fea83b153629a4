"""Load the base model and tokenizer from where `sources.resolve` put them: a hub id or a local directory.

Every source (hub, local directory, GGUF, the PyPI copy, the built-in tiny model) ends in the same
`from_pretrained` calls. Differences between models are handled by what the tokenizer and config
say (pad token, chat template, tied embeddings), never by the model's name.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jinja2
import torch
from huggingface_hub.errors import StrictDataclassError
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gsm8k_lora import hub
from gsm8k_lora.config import ModelConfig
from gsm8k_lora.errors import ConfigError, ModelLoadError
from gsm8k_lora.model import kernels, sources
from gsm8k_lora.model.files import template_text
from gsm8k_lora.model.sources import Resolved

PAD_FALLBACK = "<|pad|>"


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# What a load raises for a cause the user can act on (files, a kernel, an attention implementation, a package);
# said in one line by `_explain`. Anything else is a bug and keeps its traceback. A local directory's files are read
# at the door first (`model/files.py`); safetensors' and pickle's errors here are those of a file found later (a hub
# cache's, an old torch pickle).
LOAD_FAILURES = (OSError, ValueError, ImportError, RuntimeError, SafetensorError, pickle.UnpicklingError)
# What transformers raises for a config.json it cannot build a model from: huggingface_hub's strict dataclass
# checks (a value of the wrong type, heads that do not divide the hidden size), a lookup of an unknown name (a
# `rope_type`), a value of the wrong kind used in arithmetic.
CONFIG_FAILURES = (*LOAD_FAILURES, StrictDataclassError, KeyError, TypeError, AttributeError)


def _explain(path: str, err: Exception, what: str = "model") -> ModelLoadError:
    """One line for a failed load, naming its own cause: "not a Hugging Face model" only where the directory
    lacks a config or weights, "not in the local cache" only for a hub id that is not there; any other failure
    (a kernel, an attention implementation, a corrupt file) keeps its type and message."""
    local = Path(path).expanduser()
    cause = f"{type(err).__name__}: {_first_line(err)}"
    if local.is_dir():
        lacks = [name for name, ok in (("config.json", (local / "config.json").is_file()),
                                       ("weights (*.safetensors, *.bin)",
                                        any(next(local.glob(p), None) for p in WEIGHT_FILES))) if not ok]
        if lacks and what == "model":
            return ModelLoadError(f"{path!r} is a directory but not a Hugging Face model: it has no "
                                  f"{' and no '.join(lacks)}")
        return ModelLoadError(f"cannot load the {what} of {path!r}: {cause}")
    if not hub.model_in_cache(path):
        return ModelLoadError(f"cannot load {path!r}: not in the local cache and the hub is unreachable or the id is "
                              f"wrong ({cause}). Offline, use model=tiny, model=smollm2_135m (a copy on PyPI) or "
                              f"model.name_or_path=/path/to/a/model/directory")
    return ModelLoadError(f"cannot load the {what} of {path!r} (in the local cache): {cause}")


def _config_file(path: str) -> str:
    local = Path(path).expanduser() / "config.json"
    return str(local) if local.is_file() else f"the config.json of {path!r}"


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "no message")


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except LOAD_FAILURES as err:
        raise _explain(path, err, "tokenizer") from err
    if cfg.chat_template_path:
        tokenizer.chat_template = template_text(Path(cfg.chat_template_path).expanduser())
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer of {path!r} has no chat template; supply one with "
                             f"model.chat_template_path=FILE.jinja")
    check_chat_template(tokenizer, cfg.chat_template_path or _template_file(path))
    set_distinct_pad_token(tokenizer)
    return tokenizer


def _template_file(path: str) -> str:
    local = Path(path).expanduser()
    jinja = local / "chat_template.jinja"
    return str(jinja if jinja.is_file() else local / "tokenizer_config.json") if local.is_dir() else path


def check_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """The template rendered once on a one-question conversation, as every prompt is rendered: a template jinja
    cannot compile or render fails here, naming its file, before any weights load."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "1 + 1?"}], tokenize=False,
                                      add_generation_prompt=True)
    except jinja2.TemplateError as err:
        line = f" at line {err.lineno}" if getattr(err, "lineno", None) else ""
        raise ModelLoadError(f"{where}: its chat template cannot be used ({type(err).__name__}{line}: "
                             f"{_first_line(err)})") from err


def set_distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """A pad token that is not EOS. With pad == EOS, code that drops pad positions (batched generation,
    padded collators) also drops the EOS that ends each answer, so the model is never taught, or seen,
    to stop. The unknown token is used where it is distinct; else a new `<|pad|>` token (the model's
    embeddings are then resized by `load_model`; a pad position is never attended to nor a label)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    unk = tokenizer.unk_token
    if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = unk
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_FALLBACK})


def four_bit_device(use_cpu: bool = False) -> str:
    """Where a 4-bit model runs here: the current CUDA device, else the CPU where the installed
    bitsandbytes has CPU kernels (slow, but the same QLoRA code path). Checked before any load."""
    if torch.cuda.is_available() and not use_cpu:
        return f"cuda:{torch.cuda.current_device()}"
    try:
        import bitsandbytes  # an optional extra (.[qlora]), imported only for 4-bit loading
    except ImportError:
        raise ConfigError("model.load_in_4bit=True is invalid: bitsandbytes is not installed; "
                          "pip install -e .[qlora], or set model.load_in_4bit=false") from None
    if "cpu" not in getattr(bitsandbytes, "supported_torch_devices", ()):
        raise ConfigError(f"model.load_in_4bit=True is invalid: there is no CUDA GPU and bitsandbytes "
                          f"{bitsandbytes.__version__} has no CPU kernels; use a CUDA GPU or model.load_in_4bit=false")
    return "cpu"


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig  # needs bitsandbytes: pip install .[qlora]

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(path: str, cfg: ModelConfig, use_cpu: bool = False,
               tokenizer: PreTrainedTokenizerBase | None = None, config=None) -> PreTrainedModel:
    dtype = resolve_dtype(cfg.dtype)
    config = config or build_config(path, cfg)
    kwargs = dict(revision=cfg.revision, dtype=dtype, attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code, use_kernels=False)  # see model/kernels.py
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": four_bit_device(use_cpu)})
    try:
        with held_load_report() as report:
            # sizes that differ are refused below, in one line, instead of by transformers' report and error
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, ignore_mismatched_sizes=True,
                                                               output_loading_info=True, **kwargs)
        if cfg.hub_kernels:
            kernels.apply(model, cfg.hub_kernels)
    except LOAD_FAILURES as err:
        raise _explain(path, err) from err
    refuse_mismatched_sizes(path, info["mismatched_keys"])
    for record in report:  # the load stands: transformers' report as it would have been logged
        logging.getLogger(record.name).handle(record)
    if quant is not None and kwargs["device_map"][""] == "cpu":
        keep_cpu_4bit_differentiable(model)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token was added
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training; generation turns it back on
    return model


def build_config(path: str, cfg: ModelConfig):
    """The model's config, and a model built from it on the meta device (no memory, no weights): a config.json
    transformers cannot build a model from is said here, naming the file, apart from what its weights do."""
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except LOAD_FAILURES as err:
        raise _explain(path, err, "config") from err
    except CONFIG_FAILURES as err:
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # its field, then why
        raise ModelLoadError(f"{_config_file(path)}: transformers cannot read it ({type(err).__name__}: "
                             f"{said})") from err
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except CONFIG_FAILURES as err:
        kind = (config.architectures or [config.model_type])[0]
        raise ModelLoadError(f"{_config_file(path)}: transformers cannot build a {kind} from it "
                             f"({type(err).__name__}: {_first_line(err)})") from err
    return config


@contextmanager
def held_load_report() -> Iterator[list[logging.LogRecord]]:
    """transformers' load report (missing, unexpected and mismatched weights) held back while a model loads, for the
    caller to log once the load is not refused: a refusal is one line, not the report and then the line."""
    logger, held = logging.getLogger("transformers.modeling_utils"), []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def refuse_mismatched_sizes(path: str, mismatched) -> None:
    """transformers' (name, shape in the weights, shape by the config) of each tensor whose sizes differ."""
    if not mismatched:
        return
    key, in_file, by_config = sorted(mismatched)[0]
    raise ModelLoadError(f"{_config_file(path)} does not match the weights beside it: {key} is {list(in_file)} in the "
                         f"weights but {list(by_config)} by the config ({len(mismatched)} tensors differ)")


def load_adapter(model: PreTrainedModel, adapter: str, base: str) -> PeftModel:
    """A LoRA adapter on the base model: one that was trained on a model of other shapes or modules, or whose
    config PEFT cannot read, is one line naming the adapter."""
    try:
        return PeftModel.from_pretrained(model, adapter)
    except CONFIG_FAILURES as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
        if mismatch:
            raise ModelLoadError(f"the adapter in {adapter} was trained on another base model than {base!r}: "
                                 f"{mismatch}") from err
        raise ModelLoadError(f"{Path(adapter) / 'adapter_config.json'}: PEFT cannot apply this adapter to {base!r} "
                             f"({type(err).__name__}: {_first_line(err)})") from err


def to_device(model: PreTrainedModel, use_cpu: bool = False) -> PreTrainedModel:
    """The model on the GPU where there is one (a 4-bit model is already placed by its device map)."""
    if not getattr(model, "is_loaded_in_4bit", False):
        model.to("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    return model


def keep_cpu_4bit_differentiable(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU path repacks 4-bit weights for an AVX512-BF16 inference kernel on the first
    no-grad forward in eval mode (any evaluation pass), and that kernel has no backward: training after
    it silently loses the gradient through every frozen base weight (measured: the first layer's LoRA
    gradients were all wrong after one evaluation). No library setting turns the repack off, so this does."""
    import bitsandbytes  # an optional extra, present whenever a 4-bit model was loaded

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def weight_memory(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """Bytes the model's weights take as loaded, and what the same weights take unquantised in `dtype`:
    the memory a 4-bit base saves (the embedding and LM head stay unquantised, so with a large vocabulary
    the saving is well under 4x). Counted here rather than by `get_memory_footprint()`, which leaves out
    the 4-bit quantisation constants and knows nothing of the unquantised size."""
    loaded = unquantised = 0
    for param in model.parameters():
        loaded += param.numel() * param.element_size()
        shape = getattr(getattr(param, "quant_state", None), "shape", param.shape)  # 4-bit: the original shape
        unquantised += torch.Size(shape).numel() * dtype.itemsize
    for buffer in model.buffers():
        loaded += buffer.numel() * buffer.element_size()
        unquantised += buffer.numel() * buffer.element_size()
    for module in model.modules():  # 4-bit quantisation constants live beside the packed weights
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            loaded += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                          if isinstance(t, torch.Tensor))
    return {"weights_gib": loaded / 2**30, "weights_gib_unquantised": unquantised / 2**30,
            "weights_unquantised_dtype": str(dtype).removeprefix("torch.")}


def load(cfg: ModelConfig, cache_dir: str | None = None, use_cpu: bool = False,
         resolved: Resolved | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = (resolved or sources.resolve(cfg, cache_dir)).path
    config = build_config(path, cfg)  # first: the tokenizer reads config.json too, and says less about it
    tokenizer = load_tokenizer(path, cfg)
    return load_model(path, cfg, use_cpu, tokenizer, config), tokenizer
