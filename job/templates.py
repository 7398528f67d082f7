"""Chat templates: which one renders a dataset's chats, its name in the report, and the tokens that end an answer.

CHAT_TEMPLATE names a family's template for a base model that ships none. llama3, qwen3, gemma3 and gptoss are the
templates those models ship, read at run time from the installed TRL (trl/chat_templates/NAME.jinja); alpaca, chatml,
mistral and phi4 are written here: TRL ships neither Mistral's nor Phi-4's, and unsloth's copies cannot be imported
without a GPU.
"""

# The Unsloth Llama-3 notebook's prompt, as a chat template so that multi-turn rows work too.
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% set turns = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\\n\\n' }}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
# ChatML; assistant turns also end in EOS so that generation stops with tokenizers that lack <|im_end|>.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral's v3 instruct format (Mistral-7B-v0.3, Mixtral-8x22B, Codestral; docs.mistral.ai, "Tokenization"):
# <s>[INST] Hello[/INST] Hi!</s>[INST] How are you?[/INST] Fine.</s>. mistral-common puts a system prompt before the
# last user message; here it goes before the first, so that a turn renders alike whatever follows it (the loss mask
# finds each answer by rendering the chat up to it). The two agree on chats of one question.
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + '[/INST]' }}{% set ns.system = '' %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Phi-4's own, as microsoft/phi-4's tokenizer_config.json has it (so that a Phi-4 tokenizer's template is named phi4).
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "mistral": MISTRAL, "phi4": PHI4}
FROM_TRL = ("llama3", "qwen3", "gemma3", "gptoss")  # Llama 3(.0), Qwen3, Gemma 3, gpt-oss, as they ship them
NAMES = ("alpaca", "chatml", "llama3", "qwen3", "gemma3", "mistral", "phi4", "gptoss")  # CHAT_TEMPLATE's, beside auto


def text(name: str) -> str:
    """The template of that name: the job's own, or the one the installed TRL ships."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    from importlib.resources import files

    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def choose(tokenizer, chat_template: str, fmt: str) -> str | None:
    """The chat template to render chats with; None for raw text formats that need none of their own. A name given in
    CHAT_TEMPLATE wins over the tokenizer's own template; auto takes the tokenizer's own, else alpaca for instruction
    rows and chatml for chats."""
    if chat_template != "auto":
        return text(chat_template)
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    if fmt in ("text", "prompt_completion"):
        return None
    return TEMPLATES["alpaca" if fmt == "alpaca" else "chatml"]


def name(template: str) -> str:
    """The template's name in the report and manifest: a CHAT_TEMPLATE name when it is that one word for word (a Qwen3
    tokenizer's own is qwen3), else "the tokenizer's own"."""
    return next((known for known in NAMES if text(known) == template), "the tokenizer's own")


def end_of_turn(tokenizer) -> list[int]:
    """The token ids that end an answer: EOS, and the added token that the chat template writes right after an answer
    (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Gemma's <end_of_turn>, gpt-oss's <|return|>). A base model's EOS ends a
    document (Llama 3's <|end_of_text|>, Qwen3-Base's <|endoftext|>): generation stopped at EOS alone runs on past the
    answer to MAX_NEW_TOKENS."""
    ids = [tokenizer.eos_token_id]
    answer = "ANSWER"
    try:
        chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        rest = rendered[rendered.rindex(answer) + len(answer) :]
    except Exception:  # no template (raw text rows), or one that cannot render this chat: EOS alone
        return ids
    after = tokenizer(rest, add_special_tokens=False)["input_ids"][:1]
    if after and after[0] in tokenizer.added_tokens_decoder and after[0] not in ids:
        ids += after
    return ids
