"""The base model and its LoRA adapters, from one of two backends with the same signature.

unsloth: FastLanguageModel (its own kernels, 4-bit, "unsloth" gradient checkpointing); needs CUDA,
and `import unsloth` raises without one, so only this backend imports it.
hf: transformers + peft (+ bitsandbytes NF4 when LOAD_IN_4BIT), which also trains on CPU.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from job import distributed, kernels
from job.context import Device
from job.errors import ConfigInvalid, InputNotFound, first_line
from job.settings import DEFAULT_LORA_TARGETS
from job.storage import Storage, hub_token, is_s3
from job.storage.hub import classify_hub_error

log = logging.getLogger(__name__)

# A dry run keeps BASE_MODEL itself up to this many parameters: two CPU cores train a few steps of it
# in seconds; anything larger becomes a tiny random model of the same family.
DRY_RUN_MAX_PARAMS = 50_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


@dataclass
class Base:
    """Where the base model comes from. source: a local directory or Hub id (None: nothing reachable);
    tiny_config: set when a dry run trains a tiny random model of that configuration instead; cached_only: a dry run's
    Hub id, whose files come from the Hub's cache (HF_HOME) or not at all."""

    source: str | None
    tiny_config: object = None
    cached_only: bool = False

    def describe(self) -> str:
        family = type(self.tiny_config).__name__.removesuffix("Config") if self.tiny_config else ""
        return f"tiny random {family} (dry run)" if self.tiny_config else str(self.source)


def resolve_backend(settings, device: Device) -> str:
    """The backend this machine runs the settings with; ConfigInvalid names every setting it cannot."""
    cuda = device.cuda
    backend = settings.TRAIN_BACKEND if settings.TRAIN_BACKEND != "auto" else ("unsloth" if cuda else "hf")
    if not cuda:
        problems = [
            "TRAIN_BACKEND=unsloth needs an NVIDIA GPU and none is visible: use TRAIN_BACKEND=hf"
            if backend == "unsloth" else "",
            "LOAD_IN_4BIT=true needs an NVIDIA GPU (bitsandbytes): set LOAD_IN_4BIT=false to train 16-bit on CPU"
            if settings.LOAD_IN_4BIT else "",
            f"OPTIMIZER={settings.OPTIMIZER} needs an NVIDIA GPU (bitsandbytes): use OPTIMIZER=adamw_torch"
            if "8bit" in settings.OPTIMIZER else "",
        ]  # fmt: skip
        if any(problems):  # on a GPU machine, most likely a container that was not given the GPU
            raise ConfigInvalid(
                "no NVIDIA GPU is visible (on a GPU machine: `docker run --gpus all`, the pod's nvidia.com/gpu limit, "
                "an R580 or newer driver: README, GPU drivers); " + "; ".join(p for p in problems if p)
                + " (or DRY_RUN=true)"
            )  # fmt: skip
    if backend == "unsloth":
        kernels.load_cuda_runtime()  # before xformers loads (in unsloth's import): its kernels need CUDA 12's runtime
        import unsloth  # noqa: F401  before transformers and trl are used, so that its patches apply
    return backend


def fetch_base(settings, storage: Storage, device: Device, dest: Path) -> Base:
    """Brings BASE_MODEL where it can be loaded; a dry run picks BASE_MODEL itself or a tiny model."""
    uri = settings.BASE_MODEL
    if is_s3(uri):
        # A dry run first takes everything but the weights, then the weights only for a small model.
        download(device, storage, uri, dest, lambda key: not (settings.DRY_RUN and key.endswith(WEIGHT_SUFFIXES)))
        source = str(dest)
    elif Path(uri).is_dir():
        source = uri
    elif uri.startswith(("/", "./", "../", "~")) or uri.count("/") > 1:
        raise InputNotFound(f"BASE_MODEL={uri}: no such directory: check the path, or give a Hub id or s3:// prefix")
    else:
        source = uri
    if not settings.DRY_RUN:
        return Base(source)
    # A dry run needs nothing from the Hub: BASE_MODEL's configuration and tokenizer only make its tiny model one of
    # the same family, with the same chat template. So a Hub id's come from the Hub's cache (HF_HOME) alone, never
    # from a request (huggingface_hub retries each file five times, 1 to 8 s apart, where the Hub is out of reach).
    cached_only = source == uri and not Path(uri).is_dir()
    config = _config(source, settings, cached_only)
    if config is None:
        log.info("dry run: BASE_MODEL's configuration is unreachable; a tiny Llama stands in")
        from transformers import LlamaConfig

        return Base(source if Path(source).is_dir() else None, LlamaConfig())
    if Path(source).is_dir() and parameter_count(config) <= DRY_RUN_MAX_PARAMS:
        if is_s3(uri):
            download(device, storage, uri, dest, lambda key: key.endswith(WEIGHT_SUFFIXES))
        log.info("dry run: BASE_MODEL is small enough to train on CPU as it is")
        return Base(source)
    log.info("dry run: a tiny random %s stands in for BASE_MODEL", type(config).__name__)
    return Base(source, config, cached_only)


def download(device: Device, storage: Storage, uri: str, dest: Path, keep) -> None:
    """The model's files into dest, once per node: local rank 0 downloads while the other ranks wait (and raise
    its error with it)."""
    distributed.together(device, lambda: storage.locate(uri, dest, keep=keep), here=device.local_zero)


def _config(source: str, settings, cached_only: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, token=hub_token(settings), local_files_only=cached_only)
    except Exception as exc:  # offline, gated, missing: a dry run carries on without it, a GPU run without a plan
        log.info("no configuration from %s (%s)", source, hub_error(exc, settings, "configuration"))
        return None


def config_of(base: Base, settings):
    """The configuration of the model that will be trained (the memory plan reads its shape, the export whether its
    checkpoint holds quantized weights); None when it cannot be read."""
    return base.tiny_config or (_config(base.source, settings) if base.source else None)


def parameter_count(config) -> int:
    """Parameters of a model of this configuration, counted without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def hub_error(exc: Exception, settings, what: str) -> Exception:
    """The job's error for a failed from_pretrained of BASE_MODEL's what: the Hub's failures as for hf:// datasets
    (an outage 75, no such model 66, denied or gated 77, HF_HUB_OFFLINE=1 78); anything else, such as a folder
    without the model's files, not found."""
    where = f"BASE_MODEL={settings.BASE_MODEL}"
    return classify_hub_error(exc, where, "model") or InputNotFound(
        f"{where}: cannot load the {what} ({first_line(exc)}): check the id, or point BASE_MODEL at a local or s3:// "
        "copy"
    )


def load_tokenizer(settings, base: Base, examples):
    from transformers import AutoTokenizer

    tokenizer = None
    if base.source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                base.source, token=hub_token(settings), local_files_only=base.cached_only
            )
        except Exception as exc:
            if not settings.DRY_RUN:
                raise hub_error(exc, settings, "tokenizer") from None
            log.info("dry run: no tokenizer from %s; training one on the data", base.source)
    tokenizer = tokenizer or train_tokenizer(examples)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tokenizer(examples, vocab_size: int = 2000):
    """A small byte-level BPE tokenizer learned from the rows (a list of examples, or a datasets.Dataset of them), for
    dry runs with no reachable tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for example in examples:
            yield from (m["content"] for m in example.get("messages", []))
            yield example.get("prompt", "") + example.get("completion", "")

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_model(config, tokenizer):
    """A 2-layer, 64-wide random model of config's family, sized to the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM

    for name, value in TINY_SHAPE.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen3)
        config.layer_types = config.layer_types[: TINY_SHAPE["num_hidden_layers"]]
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def load(settings, device: Device, base: Base, tokenizer, backend: str, checkpointing: bool = True):
    """The base model with fresh LoRA adapters on LORA_TARGET_MODULES, ready to train. checkpointing: unsloth's
    own activation checkpointing (the hf backend's is the trainer's: train.sft_config)."""
    if backend == "unsloth":
        return load_unsloth(settings, device, base, checkpointing)
    return load_hf(settings, device, base, tokenizer)


def load_unsloth(settings, device: Device, base: Base, checkpointing: bool):
    from unsloth import FastLanguageModel

    try:
        model, _ = FastLanguageModel.from_pretrained(
            model_name=base.source,
            max_seq_length=settings.MAX_SEQ_LENGTH,
            dtype=None,
            load_in_4bit=settings.LOAD_IN_4BIT,
            token=hub_token(settings),
            device_map={"": device.local_rank},  # one GPU per rank under torchrun
        )
    except (OSError, ValueError) as exc:
        raise hub_error(exc, settings, "model") from None
    return FastLanguageModel.get_peft_model(
        model,
        **lora_arguments(settings, model),
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        random_state=settings.SEED,
    )


def load_hf(settings, device: Device, base: Base, tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = device.cuda
    torch.manual_seed(settings.SEED)  # the tiny model's weights and LoRA's initial A matrices follow SEED
    if base.tiny_config is not None:
        model = tiny_model(base.tiny_config, tokenizer)
    else:
        kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "token": hub_token(settings)}
        if settings.LOAD_IN_4BIT:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        if cuda:
            kwargs["device_map"] = {"": device.local_rank}
        try:
            model = AutoModelForCausalLM.from_pretrained(base.source, **kwargs)
        except (OSError, ValueError) as exc:
            raise hub_error(exc, settings, "model") from None
    # No peft.prepare_model_for_kbit_training: it upcasts the embeddings, LM head and norms to fp32. On
    # Llama-3-8B the hf backend peaked at 22.2 GiB with it and 9.4 without, and now follows unsloth's loss step
    # for step (docs/benchmarks.md). get_peft_model freezes the base; the trainer checkpoints activations
    # (sft_config) and TRL makes the inputs require gradients for that.
    return get_peft_model(model, LoraConfig(**lora_arguments(settings, model), task_type="CAUSAL_LM"))


def lora_arguments(settings, model) -> dict:
    """PEFT's LoRA arguments for the model: LORA_TARGET_MODULES as lora_targets reads them for it, each checked."""
    linear = linear_names(model)
    targets = lora_targets(settings, linear)
    missing = sorted(set(targets) - linear)
    if missing:
        raise ConfigInvalid(
            f"LORA_TARGET_MODULES: {','.join(missing)} not in BASE_MODEL; its linear layers are "
            f"{','.join(sorted(linear - {'lm_head'}))}: pick from those"
        )
    covered = set(targets).union(*(FUSED.get(t, ()) for t in targets))
    if dropped := [t for t in settings.LORA_TARGET_MODULES if t not in covered]:
        log.warning("LORA_TARGET_MODULES: BASE_MODEL has no linear layers named %s (gpt-oss's experts, for one, are "
                    "not linear layers): adapting %s; set LORA_TARGET_MODULES to choose from its linear layers: %s",
                    ",".join(dropped), ",".join(targets), ",".join(sorted(linear - {"lm_head"})))  # fmt: skip
    elif targets != settings.LORA_TARGET_MODULES:
        log.info("LORA_TARGET_MODULES: BASE_MODEL joins the default's projections in %s: adapting %s",
                 ",".join(t for t in targets if t in FUSED), ",".join(targets))  # fmt: skip
    return {
        "r": settings.LORA_R,
        "lora_alpha": settings.LORA_ALPHA,
        "lora_dropout": settings.LORA_DROPOUT,
        "target_modules": targets,
        "bias": "none",
    }


def linear_names(model) -> set[str]:
    """The names (last part) of the model's linear layers, which LoRA can adapt."""
    import torch

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }


# The default LORA_TARGET_MODULES names Llama's projections. Families that fuse some (Phi-3 and microsoft/phi-4: q,
# k and v in qkv_proj; gate and up in gate_up_proj) get the fused layer in place of its parts, and mixtures of experts
# whose experts are no linear layers (gpt-oss in transformers 5.17: 3-D parameters) their attention, not exit 78.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def lora_targets(settings, linear: set[str]) -> list[str]:
    """The layers that get adapters, given the model's linear layers: LORA_TARGET_MODULES; for the default, fused
    equivalents where the model has those and none of the parts, and the attention alone where the model has it but
    not the MLP's projections."""
    targets = list(settings.LORA_TARGET_MODULES)
    if targets != DEFAULT_LORA_TARGETS:
        return targets
    for fused, parts in FUSED.items():
        if fused in linear and not set(parts) & linear:
            targets = [t for t in targets if t not in parts] + [fused]
    if linear >= ATTENTION:
        targets = [t for t in targets if t in linear]
    return targets
