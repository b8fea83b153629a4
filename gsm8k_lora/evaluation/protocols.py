"""lm-evaluation-harness's `gsm8k` protocol (lm-eval 0.4.13), rebuilt as pure functions.

What lm-eval does, and where (paths inside the `lm_eval` package):
- Prompt (`api/task.py` `fewshot_context`, `build_qa_turn`; `api/utils.py` `Message`): each shot is
  `Question: {question}\\nAnswer:`, the target delimiter " ", GSM8K's whole `answer` field, then the few-shot
  delimiter "\\n\\n". The question under test ends at `Answer:`, with no trailing space.
- Chat (`--apply_chat_template`, which turns `--fewshot_as_multiturn` on by default, `config/evaluate_config.py`):
  the same strings as turns, user `Question: ...\\nAnswer:` and assistant the bare answer (`Message.to_dict` drops
  both delimiters), then the question under test as a user turn and the template's generation prompt. No system
  message unless one is given, so a template's own default system prompt applies.
- Shots (`api/samplers.py` `ContextSampler.sample`, seed `defaults.py` DEFAULT_OTHER_SEED): one
  `random.Random(1234)` per task, and one `rnd.sample(train, 5)` per question under test, in test-split order.
  The shots of question i therefore depend on i: see `lm_eval_shots`.
- Generation (`gsm8k.yaml` `generation_kwargs`; `defaults.py` DEFAULT_MAX_GEN_TOKS; `models/huggingface.py`
  `generate_until`): greedy, at most 256 new tokens, stop at `Question:`, `</s>`, `<|im_end|>` and the
  tokenizer's EOS; the decoded text is then cut at the stop sequences (`models/utils.py`
  `postprocess_generated_text`).
Tokenisation follows lm-eval's HF wrapper (`tok_batch_encode`) in `generation.adds_special_tokens`: the
tokenizer's own special tokens, unless the prompt already starts with BOS.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default `--seed` for the few-shot sampler
TARGET_DELIMITER = " "  # between a shot's `Answer:` and its answer (TaskConfig default)
FEWSHOT_DELIMITER = "\n\n"  # after each shot's answer (TaskConfig default)


@dataclass(frozen=True)
class Protocol:
    name: str
    stop_sequences: tuple[str, ...]  # lm-eval adds the tokenizer's EOS: `lm_eval_stop_sequences`
    max_new_tokens: int
    greedy: bool
    num_fewshot: int
    chat: bool  # --apply_chat_template --fewshot_as_multiturn


_STOPS = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_GSM8K = Protocol("lm_eval_gsm8k", _STOPS, max_new_tokens=256, greedy=True, num_fewshot=5, chat=False)
LM_EVAL_GSM8K_CHAT = Protocol("lm_eval_gsm8k_chat", _STOPS, max_new_tokens=256, greedy=True, num_fewshot=5, chat=True)
BY_EVAL_PROMPT = {"lm_eval_gsm8k": LM_EVAL_GSM8K_CHAT, "lm_eval_gsm8k_plain": LM_EVAL_GSM8K}  # eval.prompt names


def describe(ecfg: Mapping, short: bool = False) -> str:
    """How the answers were asked for, from an `eval` config (a run's config.yaml, or `asdict(EvalConfig)`);
    `short`: the terminal's form, without the stops."""
    prompt, k = ecfg["prompt"], ecfg["num_fewshot"]
    protocol = BY_EVAL_PROMPT.get(prompt)
    if protocol is not None:
        stops = ", ".join(f"`{s}`" for s in protocol.stop_sequences)
        form = "--apply_chat_template --fewshot_as_multiturn" if protocol.chat else "plain text"
        text = f"lm-eval `gsm8k`, {k}-shot, {form}, greedy, {protocol.max_new_tokens} new tokens"
        return text if short else f"{text}, stop at {stops} or EOS"
    samples = ecfg["num_samples"]
    sampling = (f"{samples} samples at temperature {ecfg['temperature']} (maj@{samples}, pass@{samples})"
                if samples > 1 else "greedy")
    head = ("zero-shot (the training prompt)" if prompt == "zero_shot_cot"
            else f"{k}-shot chat (worked examples as earlier turns)")
    text = f"{head}, {sampling}, at most {ecfg.get('max_new_tokens')} new tokens"
    return text if short else f"{text}, stop at EOS, end of turn or a complete `#### N` line"


def lm_eval_stop_sequences(protocol: Protocol, eos_token: str | None) -> list[str]:
    """The stop list lm-eval generates with: the task's `until`, plus the EOS string if not already in it."""
    stops = list(protocol.stop_sequences)
    return stops + [eos_token] if eos_token is not None and eos_token not in stops else stops


def lm_eval_truncate(generation: str, stop_sequences: Sequence[str]) -> str:
    """The text lm-eval grades: the generation cut at each stop sequence in turn (empty ones ignored)."""
    for stop in stop_sequences:
        if stop:
            generation = generation.split(stop)[0]
    return generation


def lm_eval_shots(train_rows: Sequence[Mapping], num_questions: int, num_fewshot: int = 5,
                  seed: int = LM_EVAL_FEWSHOT_SEED) -> list[list[Mapping]]:
    """The shots lm-eval gives each of the first `num_questions` test questions, in test-split order.

    Matches lm-eval when `train_rows` is the hub's whole `train` split in its row order (7,473 rows, the order
    of the JSONL mirrors); a filtered or re-split pool gives other shots. Only the pool's size and order matter,
    since `random.sample` picks by position. It differs from lm-eval where lm-eval's own order differs:
    `--samples` (questions re-numbered), several data-parallel ranks (one fresh generator per rank), or a
    question list that does not start at the first test row.
    """
    if num_fewshot == 0:  # lm-eval returns before drawing, so the generator does not move
        return [[] for _ in range(num_questions)]
    rnd, pool = random.Random(seed), list(train_rows)
    return [rnd.sample(pool, num_fewshot) for _ in range(num_questions)]


def lm_eval_question(question: str) -> str:
    """The task's `doc_to_text`."""
    return f"Question: {question}\nAnswer:"


def lm_eval_plain_prompt(question: str, shots: Sequence[Mapping], system_instruction: str | None = None) -> str:
    """The plain-text prompt. A system instruction, if any, is glued on with no separator, as lm-eval does."""
    parts = [system_instruction or ""]
    parts += [lm_eval_question(s["question"]) + TARGET_DELIMITER + s["answer"] + FEWSHOT_DELIMITER for s in shots]
    return "".join(parts) + lm_eval_question(question)


def lm_eval_chat_messages(question: str, shots: Sequence[Mapping], system_instruction: str | None = None,
                          fewshot_as_multiturn: bool = True) -> list[dict[str, str]]:
    """The messages lm-eval hands to the chat template. Without multi-turn, the plain prompt is one user turn."""
    messages = [{"role": "system", "content": system_instruction}] if system_instruction else []
    if not fewshot_as_multiturn:
        return messages + [{"role": "user", "content": lm_eval_plain_prompt(question, shots)}]
    for shot in shots:
        messages += [{"role": "user", "content": lm_eval_question(shot["question"])},
                     {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": lm_eval_question(question)}]


def lm_eval_chat_prompt(tokenizer, question: str, shots: Sequence[Mapping], system_instruction: str | None = None,
                        fewshot_as_multiturn: bool = True) -> str:
    """The chat prompt, rendered as lm-eval's HF wrapper renders it (`apply_chat_template` there)."""
    messages = lm_eval_chat_messages(question, shots, system_instruction, fewshot_as_multiturn)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         continue_final_message=False)
