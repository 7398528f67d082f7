"""Chat templates: which one renders a dataset's chats, and the job's own for base models that have none."""

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
TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML}


def choose(tokenizer, chat_template: str, fmt: str) -> str | None:
    """The chat template to render chats with; None for raw text formats that need none of their own."""
    if chat_template != "auto":
        return TEMPLATES[chat_template]
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    if fmt in ("text", "prompt_completion"):
        return None
    return TEMPLATES["alpaca" if fmt == "alpaca" else "chatml"]


def name(template: str) -> str:
    return next((known for known, text in TEMPLATES.items() if text == template), "the tokenizer's own")
