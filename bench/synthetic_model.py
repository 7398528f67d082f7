"""A random-initialised model of a real shape, saved with save_pretrained beside a tokenizer of its family (a BPE
learned from a data file, with the family's special tokens, BOS and EOS, and its chat template), for GPU runs on hosts
that cannot download weights.

    python bench/synthetic_model.py --shape qwen3-8b --out /tmp/qwen3-8b [--data demo/instructions.jsonl]

Random weights are right for speed and memory; to see a model learn, train on a structured task.
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

# The dimensions of each model's published config.json (huggingface.co/ID/blob/main/config.json; for Gemma 3 12B its
# text_config): meta-llama/Meta-Llama-3-8B, meta-llama/Llama-3.2-1B, Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B, Qwen/Qwen3-8B,
# mistralai/Mistral-7B-v0.3, google/gemma-3-1b-pt, google/gemma-3-12b-pt, microsoft/phi-4, openai/gpt-oss-20b.
# The vocabulary is the family's (below) unless a shape names its own.
SHAPES = {
    "llama-3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "llama-3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
    "qwen3-1.7b": {"hidden_size": 2048, "num_hidden_layers": 28, "intermediate_size": 6144, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
    "qwen3-8b": {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    "mistral-7b-v0.3": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "tie_word_embeddings": False},
    "gemma-3-1b": {"hidden_size": 1152, "num_hidden_layers": 26, "intermediate_size": 6912, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512, "tie_word_embeddings": True},
    "gemma-3-12b": {"hidden_size": 3840, "num_hidden_layers": 48, "intermediate_size": 15360, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 1024, "vocab_size": 262208,
                    "tie_word_embeddings": True},
    "phi-4": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 17920, "num_attention_heads": 40,
              "num_key_value_heads": 10, "tie_word_embeddings": False},
    "gpt-oss-20b": {"hidden_size": 2880, "num_hidden_layers": 24, "intermediate_size": 2880, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
                    "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False},
}  # fmt: skip
# Shapes too large to hold in 16-bit on one host (Llama-3.1-70B is 141 GB in bf16): build_nf4 writes them in NF4,
# one module at a time. meta-llama/Llama-3.1-8B and Llama-3.1-70B (128k positions: llama3 RoPE scaling), and
# Qwen/Qwen3-32B, as published.
LLAMA_31 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
SHAPES |= {
    "llama-3.1-8b": SHAPES["llama-3-8b"] | LLAMA_31,
    "llama-3.1-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False} | LLAMA_31,
    "qwen3-32b": {"hidden_size": 5120, "num_hidden_layers": 64, "intermediate_size": 25600, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
}  # fmt: skip
FAMILY = {"llama-3-8b": "llama3", "llama-3.2-1b": "llama3", "qwen3-0.6b": "qwen3", "qwen3-1.7b": "qwen3",
          "qwen3-8b": "qwen3", "mistral-7b-v0.3": "mistral", "gemma-3-1b": "gemma3", "gemma-3-12b": "gemma3",
          "phi-4": "phi4", "gpt-oss-20b": "gptoss", "tiny": "llama3", "llama-3.1-8b": "llama3",
          "llama-3.1-70b": "llama3", "qwen3-32b": "qwen3"}  # fmt: skip
# build_nf4 writes a shard once it holds this much: with one module in 16-bit (Llama-3.1-70B's embedding is 2.1 GB),
# what the host holds at a time.
SHARD_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Family:
    """What a family's base checkpoints share: the configuration class, the vocabulary size (so that the embedding and
    LM head keep their real cost), and the tokenizer's special tokens, BOS and EOS as the base model's
    tokenizer_config.json sets them. template: its name in job.templates (CHAT_TEMPLATE)."""

    config: str
    vocab: int
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    adds_bos: bool  # the tokenizer puts BOS before every text
    template: str
    pad: str | None = None
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's think tags)
    settings: dict = field(default_factory=dict)  # configuration values beside the shape's, as published


FAMILIES = {
    "llama3": Family("LlamaConfig", 128256, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>", True, "llama3",
                     settings={"rope_theta": 500000.0, "max_position_embeddings": 8192}),
    "qwen3": Family("Qwen3Config", 151936, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>",
                    False, "qwen3", pad="<|endoftext|>", added=("<think>", "</think>"),
                    settings={"rope_theta": 1000000.0, "max_position_embeddings": 40960}),
    "mistral": Family("MistralConfig", 32768, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", True,
                      "mistral", settings={"rope_theta": 1000000.0, "max_position_embeddings": 32768,
                                           "sliding_window": None}),
    "gemma3": Family("Gemma3TextConfig", 262144, ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                     "<end_of_turn>"), "<bos>", "<eos>", True, "gemma3", pad="<pad>"),
    # EOS as microsoft/phi-4 was published (unsloth's copies end on <|im_end|>); turns end on <|im_end|> either way.
    "phi4": Family("Phi3Config", 100352, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"),
                   "<|endoftext|>", "<|endoftext|>", False, "phi4",
                   settings={"rope_theta": 250000.0, "max_position_embeddings": 16384}),
    "gptoss": Family("GptOssConfig", 201088, ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>",
                     "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"), "<|startoftext|>", "<|return|>", False,
                     "gptoss", pad="<|endoftext|>"),
}  # fmt: skip
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "instructions.jsonl"
VOCAB = FAMILIES["llama3"].vocab  # Llama 3's vocabulary size


def family_tokenizer(family: str, texts, vocab_size: int = 8000):
    """A byte-level BPE learned from texts, with the family's special tokens, BOS, EOS and chat template: a stand-in for
    its real tokenizer, which the Hub would give."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from job import templates

    spec = FAMILIES[family]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    model.train_from_iterator(texts, trainer)
    if spec.adds_bos:
        bos = [(spec.bos, model.token_to_id(spec.bos))]
        model.post_processor = processors.TemplateProcessing(single=f"{spec.bos} $A", special_tokens=bos)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=spec.bos, eos_token=spec.eos,
                                        pad_token=spec.pad)  # fmt: skip
    tokenizer.add_tokens(list(spec.added))
    tokenizer.chat_template = templates.text(spec.template)
    return tokenizer


def config(shape: str, tokenizer=None, layers: int | None = None):
    """The transformers configuration of that shape, its token ids taken from tokenizer when given; layers: that
    many of its decoder layers instead of all (the shape's widths, a small model)."""
    import transformers

    spec = FAMILIES[FAMILY[shape]]
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if layers:
        ids["num_hidden_layers"] = layers
    return getattr(transformers, spec.config)(
        **{"vocab_size": spec.vocab, "dtype": "bfloat16"} | spec.settings | SHAPES[shape] | ids
    )


def texts_of(data: Path) -> list[str]:
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return [" ".join(str(v) for v in row.values()) for row in rows]


def build(shape: str, out: Path, data: Path = DEMO_DATA, quantized: bool = False, tiny: bool = False) -> None:
    """quantized: saved in bitsandbytes NF4 (on a GPU), as the pre-quantized checkpoints the job loads by default
    (unsloth/llama-3-8b-bnb-4bit): loading skips the quantization. tiny: the shape's family at the job's dry-run size
    (job.model.tiny_model: 2 layers, 64 wide, the tokenizer's vocabulary), for tests on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.model import tiny_model

    tokenizer = family_tokenizer(FAMILY[shape], texts_of(data))
    model_config = config(shape, tokenizer)
    if tiny:
        model = tiny_model(model_config, tokenizer)
    else:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    if quantized:
        import tempfile

        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as full:
            model.save_pretrained(full)
            del model
            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(full, quantization_config=nf4, device_map={"": 0})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{shape}: {params:,} parameters saved to {out}" + (" in NF4" if quantized else ""))


def nf4_config():
    """The quantization of the pre-quantized checkpoints the job loads by default (unsloth/llama-3-8b-bnb-4bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def quantized_names(model) -> set[str]:
    """The weights that transformers' bitsandbytes quantizer stores in 4-bit: those of the linear modules it replaces
    with bnb.nn.Linear4bit (every nn.Linear but the LM head and the model's fp32 modules), found by running its own
    replacement on a meta copy of model."""
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=nf4_config(), pre_quantized=True)
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def random_tensors(model_config, device: str):
    """(name, tensor) for every parameter that save_pretrained would write, initialised by the model's own
    _init_weights (bf16, on device) one module at a time: the whole model is never in memory. Seeded: the same
    configuration gives the same tensors on one kind of device."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    written = dict(model.named_parameters())  # a tied weight once, under its first name
    for prefix, module in model.named_modules():
        names = [f"{prefix}.{n}".lstrip(".") for n, _ in module.named_parameters(recurse=False)]
        if not any(name in written for name in names):
            continue
        module.to_empty(device=device, recurse=False)
        model._init_weights(module)
        for name, tensor in zip(names, module.parameters(recurse=False)):
            if name in written:
                yield name, tensor.detach()
        module.to_empty(device="meta", recurse=False)


def write_nf4(model_config, tensors, out: Path, shard_bytes: int = SHARD_BYTES) -> int:
    """Writes tensors ((name, bf16 tensor) in any order, on a GPU or the CPU) as save_pretrained writes a model
    quantized by transformers' bitsandbytes quantizer: each linear weight as bitsandbytes' packed uint8 NF4 with its
    quant_state tensors (absmax, quant_map, nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4), the
    rest in bf16; safetensors shards with model.safetensors.index.json; config.json with quantization_config. The
    host holds one shard at a time. Returns the parameter count."""
    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    architecture, quantized = type(model).__name__, quantized_names(model)
    out.mkdir(parents=True, exist_ok=True)
    shards, shard, parameters, total = [], {}, 0, 0

    def flush() -> None:
        if shard:
            save_file(shard, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            shards.append(list(shard))
            shard.clear()

    for name, tensor in tensors:
        parameters += tensor.numel()
        if name in quantized:
            packed, state = quantize_4bit(tensor, compress_statistics=True, quant_type="nf4")
            parts = {name: packed} | {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}
        else:
            parts = {name: tensor.to(torch.bfloat16)}
        for key, value in parts.items():
            shard[key] = value.to("cpu").contiguous()
            total += value.numel() * value.element_size()
        if sum(v.numel() * v.element_size() for v in shard.values()) >= shard_bytes:
            flush()
    flush()
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for i, file in enumerate(files):
        (out / f"part-{i}.safetensors").rename(out / file)
    if len(files) > 1:
        index = {"metadata": {"total_parameters": parameters, "total_size": total},
                 "weight_map": {key: file for file, keys in zip(files, shards) for key in sorted(keys)}}  # fmt: skip
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model_config.architectures = [architecture]
    model_config.quantization_config = nf4_config().to_dict()
    model_config.save_pretrained(out)
    GenerationConfig.from_model_config(model_config).save_pretrained(out)
    return parameters


def build_nf4(shape: str, out: Path, data: Path = DEMO_DATA, tiny: bool = False, layers: int | None = None) -> None:
    """The shape as a pre-quantized NF4 checkpoint (unsloth/Meta-Llama-3.1-70B-bnb-4bit is one), beside its family's
    tokenizer, built and quantized module by module (on the GPU when there is one): a 70B never exists in 16-bit,
    and the host holds about one shard (SHARD_BYTES). tiny: the family at the job's dry-run size, for tests on CPU;
    layers: that many of the shape's decoder layers (config)."""
    import resource
    import time

    import torch

    from job.model import tiny_model

    start, tokenizer = time.time(), family_tokenizer(FAMILY[shape], texts_of(data))
    model_config = tiny_model(config(shape, tokenizer), tokenizer).config if tiny else config(shape, tokenizer, layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parameters = write_nf4(model_config, random_tensors(model_config, device), out)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{shape}: {parameters:,} parameters saved to {out} in NF4: {size / 1e9:.1f} GB in "
          f"{time.time() - start:.0f} s on {device}, peak host memory {host:.1f} GiB")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEMO_DATA)
    parser.add_argument("--4bit", dest="quantized", action="store_true", help="save in NF4 (needs a GPU)")
    parser.add_argument("--nf4", action="store_true", help="save in NF4 module by module (any size; GPU or CPU)")
    parser.add_argument("--tiny", action="store_true", help="the shape's family at the dry run's size (tests, CPU)")
    args = parser.parse_args()
    if args.nf4:
        build_nf4(args.shape, args.out, args.data, args.tiny)
    else:
        build(args.shape, args.out, args.data, args.quantized, args.tiny)
