"""Chat templates per family on CPU: Llama 3, Qwen3, Gemma 3 and gpt-oss as TRL ships their templates (read from the
installed package), Mistral and Phi-4 as job/templates.py writes them. Each family's tokenizer is a BPE learned on the
spot with the family's special tokens, BOS and EOS (bench/synthetic_model.py), since the Hub is out of reach."""

import json
from datetime import date
from importlib.resources import files
from typing import get_args

import pytest
import torch
from trl.chat_template_utils import has_generation_markers

from bench.synthetic_model import FAMILIES, FAMILY, SHAPES, build, config, family_tokenizer
from job import data, samples, templates
from job.model import parameter_count, tiny_model, train_tokenizer
from job.settings import Settings
from tests.conftest import DEMO_DATA, jsonl

TEXTS = ["Be brief. one first answer two second answer hello world, the quick brown fox jumps over the lazy dog"] * 4
ONE_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer"}]  # fmt: skip
CHAT = [*ONE_TURN, {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]

# CHAT as each family's template renders it for training, and what of it is trained: each answer after the generation
# prompt, through its end-of-turn token (and the newline the template writes after it).
GPT_OSS_SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
    "Current date: {today}\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be "
    "included for every message.<|end|>"
)
RENDERED = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\none<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "first answer<|eot_id|><|start_header_id|>user<|end_header_id|>\n\ntwo<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nsecond answer<|eot_id|>",
        ["first answer<|eot_id|>", "second answer<|eot_id|>"],
    ),
    # Qwen3's own template writes the empty think block into the last answer only; a chat of several answers renders
    # with TRL's training variant of it, where every answer has one (as Qwen3 writes one after the prompt).
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nfirst answer<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nsecond answer<|im_end|>\n",
        ["<think>\n\n</think>\n\nfirst answer<|im_end|>\n", "<think>\n\n</think>\n\nsecond answer<|im_end|>\n"],
    ),
    "gemma3": (
        "<bos><start_of_turn>user\nBe brief.\n\none<end_of_turn>\n<start_of_turn>model\nfirst answer<end_of_turn>\n"
        "<start_of_turn>user\ntwo<end_of_turn>\n<start_of_turn>model\nsecond answer<end_of_turn>\n",
        ["first answer<end_of_turn>\n", "second answer<end_of_turn>\n"],
    ),
    "mistral": (
        "<s>[INST] Be brief.\n\none[/INST] first answer</s>[INST] two[/INST] second answer</s>",
        [" first answer</s>", " second answer</s>"],
    ),
    "phi4": (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>one<|im_end|>"
        "<|im_start|>assistant<|im_sep|>first answer<|im_end|><|im_start|>user<|im_sep|>two<|im_end|>"
        "<|im_start|>assistant<|im_sep|>second answer<|im_end|>",
        ["first answer<|im_end|>", "second answer<|im_end|>"],
    ),
    # gpt-oss ends the last answer with <|return|> (the model's stop token) and earlier ones with <|end|>.
    "gptoss": (
        GPT_OSS_SYSTEM + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        "<|start|>user<|message|>one<|end|><|start|>assistant<|channel|>final<|message|>first answer<|end|>"
        "<|start|>user<|message|>two<|end|><|start|>assistant<|channel|>final<|message|>second answer<|return|>",
        ["<|channel|>final<|message|>first answer<|end|>", "<|channel|>final<|message|>second answer<|return|>"],
    ),
}
GENERATION_PROMPT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen3": "<|im_start|>assistant\n",
                     "gemma3": "<start_of_turn>model\n", "mistral": "[/INST]",
                     "phi4": "<|im_start|>assistant<|im_sep|>", "gptoss": "<|start|>assistant"}  # fmt: skip
STOPS = {"llama3": ["<|end_of_text|>", "<|eot_id|>"], "qwen3": ["<|endoftext|>", "<|im_end|>"],
         "gemma3": ["<eos>", "<end_of_turn>"], "mistral": ["</s>"], "phi4": ["<|endoftext|>", "<|im_end|>"],
         "gptoss": ["<|return|>"]}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizers():
    return {family: family_tokenizer(family, TEXTS, vocab_size=400) for family in FAMILIES}


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])


def trl_template(name: str) -> str:
    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def test_every_name_is_a_setting_and_the_families_come_from_the_installed_trl():
    assert get_args(Settings.model_fields["CHAT_TEMPLATE"].annotation) == ("auto", *templates.NAMES)
    assert set(templates.NAMES) == {*templates.TEMPLATES, *templates.FROM_TRL}
    for name in templates.FROM_TRL:
        assert templates.text(name) == trl_template(name)
    assert {spec.template for spec in FAMILIES.values()} <= set(templates.NAMES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chat_renders_as_its_family_renders_it_and_only_the_answers_are_trained(tokenizers, family):
    tokenizer = tokenizers[family]
    text, answers = RENDERED[family]
    rendered, spans = data.render(tokenizer, {"messages": CHAT})
    assert rendered == text.format(today=date.today().isoformat())
    assert [rendered[start:end] for start, end in spans] == answers
    [row] = data.tokenize(tokenizer, [{"messages": CHAT}], responses_only=True)
    assert trained_text(tokenizer, row) == "".join(answers)
    bos = [tokenizer.bos_token_id] if FAMILIES[family].adds_bos else []  # once, where the family's tokenizer adds it
    assert row["input_ids"][: len(bos)] == bos and row["input_ids"].count(tokenizer.bos_token_id) == len(bos)


@pytest.mark.parametrize("chat", [ONE_TURN, CHAT], ids=["one answer", "two answers"])
@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_the_mask_is_what_transformers_marks_with_trls_training_template(tokenizers, family, chat):
    """The families' own templates have no {% generation %} markers: the job finds answers by rendering the chat up to
    each. TRL's training variants wrap each answer and its end-of-turn token in markers (gpt-oss's wraps the turn's
    header too), and transformers masks by them: the two agree token for token."""
    tokenizer = tokenizers[family]
    assert not has_generation_markers(tokenizer.chat_template)
    marked = tokenizer.apply_chat_template(chat, chat_template=trl_template(f"{family}_training"), tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    [row] = data.tokenize(tokenizer, [{"messages": chat}], responses_only=True)
    assert row["input_ids"] == marked["input_ids"]
    assert row["assistant_masks"] == marked["assistant_masks"]
    assert 0 < sum(row["assistant_masks"]) < len(row["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sample_asks_with_the_text_that_precedes_the_trained_answer(tokenizers, family):
    tokenizer = tokenizers[family]
    for chat in (ONE_TURN, CHAT):
        text, spans = data.render(tokenizer, {"messages": chat})
        [sample] = data.sample_inputs(tokenizer, [{"messages": chat}])
        asked = text[: spans[-1][0]]
        if family == "qwen3":  # asked as Qwen3 is asked: earlier answers without their think blocks
            asked = asked.replace("<think>\n\n</think>\n\n", "")
        assert sample["input"] == asked and sample["input"].endswith(GENERATION_PROMPT[family])
        assert (sample["prompt"], sample["reference"]) == (chat[-2]["content"], chat[-1]["content"])


def test_mistral_renders_as_mistral_documents_its_v3_format(tokenizers):
    """docs.mistral.ai, "Tokenization", the V3 row (Mistral-7B-v0.3 and others)."""
    chat = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine, and you?"},
            {"role": "user", "content": "I'm doing great!"},
            {"role": "assistant", "content": "Glad to hear!"}]  # fmt: skip
    text, _ = data.render(tokenizers["mistral"], {"messages": chat})
    assert text == (
        "<s>[INST] Hello, how are you?[/INST] Fine, and you?</s>[INST] I'm doing great![/INST] Glad to hear!</s>"
    )


def test_a_template_that_renders_the_prompt_otherwise_once_an_answer_follows_is_refused():
    """Mistral-7B-Instruct-v0.3's own template, reduced to chats: the system prompt goes into the question only when the
    chat ends with it, so the prompt a sample is asked with is not the text that precedes the trained answer."""
    tokenizer = family_tokenizer("mistral", TEXTS, vocab_size=400)
    tokenizer.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
        "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    text, spans = data.render(tokenizer, {"messages": CHAT[1:]})  # no system prompt: the template is consistent
    assert [text[start:end] for start, end in spans] == [" first answer</s>", " second answer</s>"]
    with pytest.raises(data.ConfigInvalid, match="renders earlier turns differently.*CHAT_TEMPLATE to .*mistral"):
        data.render(tokenizer, {"messages": ONE_TURN})


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_end_at_eos_or_at_the_templates_end_of_turn_token(tokenizers, family):
    tokenizer = tokenizers[family]
    assert tokenizer.convert_ids_to_tokens(templates.end_of_turn(tokenizer)) == STOPS[family]


def test_the_jobs_own_templates_end_at_eos_and_im_end():
    tokenizer = train_tokenizer([{"prompt": "", "completion": " ".join(TEXTS)}], vocab_size=300)
    for template, stops in ((None, ["</s>"]), (templates.ALPACA, ["</s>"]), (templates.CHATML, ["</s>", "<|im_end|>"])):
        tokenizer.chat_template = template
        assert tokenizer.convert_ids_to_tokens(templates.end_of_turn(tokenizer)) == stops


def test_generation_stops_at_the_end_of_turn_token_where_a_base_models_eos_runs_on():
    """A Llama 3 base tokenizer ends documents with <|end_of_text|>, the llama3 template ends answers with <|eot_id|>.
    The tiny model is steered (generation_config.sequence_bias) to answer a word, then <|eot_id|>, again and again."""
    tokenizer = family_tokenizer("llama3", TEXTS, vocab_size=400)
    tokenizer.pad_token = tokenizer.eos_token  # as job.model.load_tokenizer does when there is none
    torch.manual_seed(0)
    model = tiny_model(config("llama-3.2-1b", tokenizer), tokenizer).eval()
    word, eot = tokenizer.encode(" hello", add_special_tokens=False)[0], tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.sequence_bias = {(word,): 50.0, (word, eot): 100.0}
    [sample] = data.sample_inputs(tokenizer, [{"messages": ONE_TURN}])
    assert samples._generate(model, tokenizer, [sample["input"]], 12, "samples") == [tokenizer.decode([word])]
    # The check can fail: stopped at EOS alone, the model writes the word and <|eot_id|> until max_new_tokens.
    ids = tokenizer(sample["input"], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        run_on = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert run_on.shape[1] - ids["input_ids"].shape[1] == 12


def test_a_family_name_replaces_the_tokenizers_template_and_names_it_in_the_report(tokenizers):
    tokenizer = tokenizers["gemma3"]
    assert templates.choose(tokenizer, "auto", "messages") == tokenizer.chat_template
    assert templates.choose(tokenizer, "qwen3", "messages") == trl_template("qwen3")
    assert templates.choose(tokenizer, "mistral", "alpaca") == templates.MISTRAL
    for name in templates.NAMES:
        assert templates.name(templates.text(name)) == name
    assert templates.name(tokenizer.chat_template) == "gemma3", "a Gemma 3 tokenizer's own template is gemma3's"
    assert templates.name("{{ messages[0]['content'] }}") == "the tokenizer's own"


# Parameters as published: the model cards, and for Gemma 3 its technical report (table 1: 12B's text model is 1,012M
# embedding and 10,759M other parameters; its 417M vision encoder is not built here).
PUBLISHED = {"llama-3-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-8b": 8.2e9,
             "mistral-7b-v0.3": 7.25e9, "gemma-3-1b": 1.0e9, "gemma-3-12b": 11.77e9, "phi-4": 14.7e9,
             "gpt-oss-20b": 20.9e9}  # fmt: skip


@pytest.mark.parametrize("shape", PUBLISHED)
def test_each_shape_has_its_models_published_size(shape):
    assert abs(parameter_count(config(shape)) / PUBLISHED[shape] - 1) < 0.02


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b", "mistral-7b-v0.3", "phi-4",
                                   "gpt-oss-20b"])  # fmt: skip
def test_each_family_trains_a_chat_at_the_dry_runs_tiny_size(tokenizers, shape):
    """Through job.model.tiny_model, the dry run's own shrinking: 2 layers, 64 wide, the tokenizer's vocabulary."""
    tokenizer = tokenizers[FAMILY[shape]]
    torch.manual_seed(0)
    model = tiny_model(config(shape, tokenizer), tokenizer)
    assert type(model.config).__name__ == FAMILIES[FAMILY[shape]].config and model.config.num_hidden_layers == 2
    [row] = data.tokenize(tokenizer, [{"messages": CHAT}], responses_only=True)
    ids, mask = torch.tensor([row["input_ids"]]), torch.tensor([row["assistant_masks"]], dtype=torch.bool)
    loss = model(input_ids=ids, labels=torch.where(mask, ids, -100)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_all_shapes_are_of_a_family():
    assert set(FAMILY) == set(SHAPES) and set(FAMILY.values()) <= set(FAMILIES)


def test_a_dry_run_of_a_saved_tiny_qwen3_names_its_template_and_trains_the_answers_only(run_job, tmp_path):
    """BASE_MODEL: a 2-layer Qwen3 saved with its family's tokenizer and Qwen3's own template
    (bench/synthetic_model.py), trained as it is. The run counts in the loss what transformers marks with TRL's Qwen3
    training template."""
    from transformers import AutoTokenizer

    build("qwen3-0.6b", tmp_path / "qwen3", tiny=True)
    demo = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:12]
    chats = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r["instruction"]},
              {"role": "assistant", "content": r["output"]}] for r in demo[:6]]  # fmt: skip
    chats += [[{"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": a["output"]},
               {"role": "user", "content": b["instruction"]}, {"role": "assistant", "content": b["output"]}]
              for a, b in zip(demo[6::2], demo[7::2])]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text(jsonl({"messages": chat} for chat in chats))
    result = run_job({"DRY_RUN": "true", "BASE_MODEL": str(tmp_path / "qwen3"),
                      "DATASET_URI": str(tmp_path / "chats.jsonl"), "OUTPUT_URI": str(tmp_path / "out"),
                      "RUN_ID": "qwen3", "MAX_NEW_TOKENS": "4", "NUM_SAMPLE_PROMPTS": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "qwen3"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"]["loaded"] == str(tmp_path / "qwen3") and manifest["chat_template"] == "qwen3"
    assert "- **Chat template:** qwen3" in (run / "report.md").read_text()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qwen3")
    marked = [tokenizer.apply_chat_template(chat, chat_template=trl_template("qwen3_training"), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
              for chat in chats]  # fmt: skip
    assert manifest["dataset"]["train_tokens"] == sum(len(m["input_ids"]) for m in marked)
    assert manifest["dataset"]["train_loss_tokens"] == sum(sum(m["assistant_masks"]) for m in marked)
    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template == trl_template("qwen3"), "the plain one"
    for sample in map(json.loads, (run / "samples.jsonl").read_text().splitlines()):
        assert sample["input"].endswith("<|im_start|>assistant\n")


def test_phi_4s_fused_projections_take_the_default_adapters(run_job, tmp_path):
    """microsoft/phi-4 (Phi3ForCausalLM) joins q, k and v in qkv_proj and gate and up in gate_up_proj: the default
    LORA_TARGET_MODULES (Llama's names) exited 78 on it; the fused layers now stand for their parts, in the adapter
    and in the memory estimate. A list given is taken as it is."""
    from job import memory

    build("phi-4", tmp_path / "phi", tiny=True)
    env = {"DRY_RUN": "true", "BASE_MODEL": str(tmp_path / "phi"), "DATASET_URI": str(DEMO_DATA), "RUN_ID": "phi",
           "OUTPUT_URI": str(tmp_path / "out"), "MAX_NEW_TOKENS": "2", "NUM_SAMPLE_PROMPTS": "1"}  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((tmp_path / "out" / "phi" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    card = (tmp_path / "out" / "phi" / "adapter" / "README.md").read_text()
    assert "| LORA_TARGET_MODULES | `down_proj,gate_up_proj,o_proj,qkv_proj` |" in card, "the layers adapted"
    assert "adapting o_proj,down_proj,qkv_proj,gate_up_proj" in result.stderr
    phi_4 = config("phi-4")  # 40 layers, 5,120 wide; q, k, v: 40 + 10 + 10 heads of 128; MLP 17,920
    per_layer = (5120 + 7680) + (5120 + 5120) + (5120 + 2 * 17920) + (17920 + 5120)
    assert memory.shape(phi_4, Settings(DATASET_URI="x", OUTPUT_URI="y")).lora == 16 * 40 * per_layer
    given = run_job(env | {"RUN_ID": "phi-given", "LORA_TARGET_MODULES": "q_proj,v_proj"})
    assert given.returncode == 78 and "LORA_TARGET_MODULES: q_proj,v_proj not in BASE_MODEL" in given.stderr


def test_gpt_oss_trains_its_attention_with_the_defaults_and_samples_after(run_job, tmp_path):
    """gpt-oss's experts are 3-D parameters in transformers 5.17, no linear layers: the default LORA_TARGET_MODULES
    adapts the attention, with a warning that says so (it exited 78). TRL turns the router logits on for its
    load-balancing loss; left on, generate() failed on the samples (a mask of the whole text against the new tokens'
    logits), and the config carried it on."""
    build("gpt-oss-20b", tmp_path / "gpt-oss", tiny=True)
    result = run_job({"DRY_RUN": "true", "BASE_MODEL": str(tmp_path / "gpt-oss"), "DATASET_URI": str(DEMO_DATA),
                      "OUTPUT_URI": str(tmp_path / "out"), "RUN_ID": "gpt-oss", "MAX_SEQ_LENGTH": "512",
                      "PER_DEVICE_BATCH_SIZE": "1", "GRAD_ACCUM_STEPS": "1", "MAX_NEW_TOKENS": "3",
                      "NUM_SAMPLE_PROMPTS": "2", "LOG_FORMAT": "json"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "gpt-oss"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    warnings = [json.loads(line)["message"] for line in result.stderr.splitlines() if '"level": "warning"' in line]
    assert (
        "LORA_TARGET_MODULES: BASE_MODEL has no linear layers named gate_proj,up_proj,down_proj (gpt-oss's "
        "experts, for one, are not linear layers): adapting q_proj,k_proj,v_proj,o_proj; set LORA_TARGET_MODULES to "
        "choose from its linear layers: k_proj,o_proj,q_proj,v_proj" in warnings
    )
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["input"].endswith("<|start|>assistant") for s in samples)  # two: a batch
    # Its model builds the attention mask without position_ids: packed rows would mix (tests/test_packing.py).
    assert (
        "PACKING=true: gpt_oss builds its attention mask without position_ids, so packed rows would attend to "
        "each other: training one row per sequence" in warnings
    )
    assert json.loads((run / "metrics.json").read_text())["packing"] == "off, padded"
