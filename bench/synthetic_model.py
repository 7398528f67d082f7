"""A random-initialised model of a real shape, saved with save_pretrained beside a tokenizer learned
from a data file, for GPU runs on hosts that cannot download weights.

    python bench/synthetic_model.py --shape llama-3.2-1b --out /tmp/llama-1b [--data demo/instructions.jsonl]

Random weights are right for speed and memory; to see a model learn, train on a structured task.
"""

import argparse
import json
from pathlib import Path

SHAPES = {
    "llama-3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "llama-3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False},
}  # fmt: skip
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "instructions.jsonl"
VOCAB = 128256  # Llama 3's vocabulary size: the embedding and LM head keep their real cost


def build(shape: str, out: Path, data: Path = DEMO_DATA, quantized: bool = False) -> None:
    """quantized: saved in bitsandbytes NF4 (on a GPU), as the pre-quantized checkpoints the job loads by default
    (unsloth/llama-3-8b-bnb-4bit): loading skips the quantization."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from job.model import train_tokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    examples = [{"prompt": " ".join(str(v) for v in r.values()), "completion": ""} for r in rows]
    tokenizer = train_tokenizer(examples, vocab_size=8000)
    config = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
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
    print(f"{shape}: {params / 1e9:.2f}B parameters saved to {out}" + (" in NF4" if quantized else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEMO_DATA)
    parser.add_argument("--4bit", dest="quantized", action="store_true", help="save in NF4 (needs a GPU)")
    args = parser.parse_args()
    build(args.shape, args.out, args.data, args.quantized)
