"""Rows in the model's own chat template: the prompt training and generation both see, the system prompt
the model got, and TRL's prompt-completion pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # datasets is heavy; the protocols the door validates build prompts with this module
    from datasets import Dataset


def build_messages(question: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer, question: str, system_prompt: str | None) -> str:
    """The chat-template prompt up to the assistant turn, exactly as training and generation see it."""
    text = tokenizer.apply_chat_template(build_messages(question, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    # Tokenizers that add BOS themselves would otherwise see it twice (template text + special token).
    bos = tokenizer.bos_token
    adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and adds_bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def template_default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template inserts when none is given (SmolLM2's does), or None.

    Found by rendering: with a system message "X" the prompt reads A + "X" + B; if the prompt with no
    system message has the same frame around other text, that text is the template's default."""
    def before_question(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": "\x00"}], tokenize=False,
                                             add_generation_prompt=True)
        return text[: text.index("\x00")]

    try:
        framed = before_question([{"role": "system", "content": "\x01"}])
    except Exception:  # templates that reject a system role have no default to report
        return None
    bare = before_question([])
    head, _, tail = framed.partition("\x01")
    if len(bare) > len(head) + len(tail) and bare.startswith(head) and bare.endswith(tail):
        return bare[len(head): len(bare) - len(tail)]
    return None


def describe_system_prompt(tokenizer, system_prompt: str | None) -> str:
    """One line for metrics.json and the report: which system prompt the model saw."""
    default = template_default_system_prompt(tokenizer)
    if system_prompt is not None:
        replaced = f", replacing the template's default {default!r}" if default else ""
        return f"data.system_prompt {system_prompt!r}{replaced}"
    if default:
        return f"the chat template's default, kept (data.system_prompt=null): {default!r}"
    return "none (data.system_prompt=null and the chat template adds none)"


def to_prompt_completion(ds: Dataset, tokenizer, system_prompt: str | None) -> Dataset:
    """Rows as TRL prompt-completion pairs; TRL appends EOS to the completion so the model learns to stop."""
    return ds.map(
        lambda row: {"prompt": render_prompt(tokenizer, row["question"], system_prompt), "completion": row["answer"]},
        remove_columns=ds.column_names,
        desc="Formatting with the chat template",
    )
