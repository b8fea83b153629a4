"""The prompt protocols: each `eval.prompt` name is one `Protocol`, which owns how a question is asked (its prompt
and shots), where an answer stops (stop strings, token limit, the `#### N` line), what of it is graded, and how
the protocol is described. The rest of the package asks `protocols.get(cfg.prompt)`.

- zero_shot_cot: the training prompt (the question in the model's chat template);
- fewshot: the same, after k worked examples (the first k training rows) as earlier chat turns;
- lm_eval_gsm8k: lm-eval's `gsm8k` task with --apply_chat_template --fewshot_as_multiturn (TII's setting for
  Falcon3's published 43.9%); lm_eval_gsm8k_plain: the same task as plain text.

lm-evaluation-harness's `gsm8k` protocol (lm-eval 0.4.13), rebuilt as pure functions.

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
- Context (`models/huggingface.py` `max_length`, `generate_until`, `tok_batch_encode`; `models/utils.py`
  `resolve_max_length`): the model's length is the first of the config's `n_positions`, `max_position_embeddings`,
  `n_ctx` (its `text_config`'s where it has one), else the tokenizer's `model_max_length`, else 2048; a prompt keeps
  its last (length - 256) tokens, its BOS included where one was added, so prompt and answer always fit.
Tokenisation follows lm-eval's HF wrapper (`tok_batch_encode`) in `generation.adds_special_tokens`: the
tokenizer's own special tokens, unless the prompt already starts with BOS.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gsm8k_lora.data.formatting import build_messages, render_prompt

LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default `--seed` for the few-shot sampler
TARGET_DELIMITER = " "  # between a shot's `Answer:` and its answer (TaskConfig default)
FEWSHOT_DELIMITER = "\n\n"  # after each shot's answer (TaskConfig default)


LM_EVAL_STOPS = ("Question:", "</s>", "<|im_end|>")  # the task's `until`; lm-eval adds the tokenizer's EOS
LM_EVAL_MAX_NEW_TOKENS = 256  # lm-eval's DEFAULT_MAX_GEN_TOKS: the task's YAML sets no max_gen_toks
LM_EVAL_DEFAULT_MAX_LENGTH = 2048  # lm-eval's DEFAULT_MAX_LENGTH: the context of a model that reports none
CONTEXT_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order of reading them
TOKENIZER_INFINITY = int(1e30)  # transformers' `model_max_length` of a tokenizer that sets none (lm-eval's too)
# What lm-eval's protocols fix themselves: a value typed for these is refused, not silently replaced.
LM_EVAL_FIXED = ("eval.max_new_tokens", "eval.stop_sequences")


@dataclass(frozen=True)
class Fit:
    """A prompt as the model is given it (`Protocol.fit`)."""

    ids: list[int]  # its token ids, as fed
    cut: int  # tokens cut from its start
    room: int | None  # the most tokens an answer can have before the context's end (<= 0: none); None: no end known


@dataclass(frozen=True)
class Protocol:
    name: str  # its `eval.prompt`
    lm_eval: bool  # lm-eval's `gsm8k` task: its shots, stops, token limit and truncation; greedy
    chat: bool  # in the model's chat template (lm-eval: --apply_chat_template --fewshot_as_multiturn)
    shots_as_turns: bool = True  # worked examples before the question (fewshot and lm-eval's)

    def prompt(self, tokenizer, question: str, shots: Sequence[Mapping], system_prompt: str | None) -> str:
        """The prompt of one question."""
        if self.lm_eval:
            return (lm_eval_chat_prompt(tokenizer, question, shots, system_prompt) if self.chat
                    else lm_eval_plain_prompt(question, shots, system_prompt))
        if not shots:
            return render_prompt(tokenizer, question, system_prompt)
        head = build_messages("", system_prompt)[:-1]
        for ex in shots:
            head += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}]
        return tokenizer.apply_chat_template(head + [{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)

    def shots(self, train_rows: Sequence[Mapping], num_questions: int, num_fewshot: int) -> list[list[Mapping]]:
        """Each question's worked examples, from the train split only, never from the questions under test:
        lm-eval's own draw for its protocols (`train_rows` must then be the whole train split in its published
        order), else the first k rows for every question."""
        if self.lm_eval:
            return lm_eval_shots(train_rows, num_questions, num_fewshot)
        shots = list(train_rows[:num_fewshot]) if self.shots_as_turns else []
        return [shots] * num_questions

    def stops(self, eos_token: str | None, own: Sequence[str]) -> list[str]:
        """The stop strings: lm-eval's (and EOS) for its protocols, else `own` (the new-turn markers and
        `eval.stop_sequences`)."""
        if self.lm_eval:
            return lm_eval_stop_sequences(eos_token)
        return list(own)

    def fit(self, ids: list[int], context: int | None, max_new_tokens: int) -> Fit:
        """A prompt's token ids as the model is given them, for a model of `context` positions (`context_length`;
        None: it reports none). lm-eval's protocols keep the prompt's last `max_length - max_new_tokens` tokens, as
        lm-eval does, so the answer always has its budget. The package's own never cut a prompt (its start is the
        chat template, the system turn and the first shots: cut, it is another question): the answer may run only
        to the context's last position (`room`), and a prompt that leaves no room for one token is not answered."""
        keep = lm_eval_max_length(context) - max_new_tokens  # lm-eval's `max_ctx_len` (`context_problem`: > 0)
        cut = max(0, len(ids) - keep) if self.lm_eval else 0
        ids = ids[cut:]
        return Fit(ids, cut, None if context is None else context - len(ids))

    def token_limit(self, max_new_tokens: int) -> int:
        return LM_EVAL_MAX_NEW_TOKENS if self.lm_eval else max_new_tokens

    @property
    def stops_at_answer_line(self) -> bool:
        """Whether a row stops once its `#### N` line is complete (lm-eval's generate until a stop string)."""
        return not self.lm_eval

    @property
    def adds_special_tokens(self) -> bool:
        """lm-eval tokenises with the tokenizer's own special tokens (`tok_batch_encode`); the package's own
        prompts hold them already, from the chat template."""
        return self.lm_eval

    def graded_text(self, text: str, stops: Sequence[str]) -> str:
        """What of a completion is graded: lm-eval's cut at its stops, else all of it."""
        return lm_eval_truncate(text, stops) if self.lm_eval else text

    def describe(self, ecfg: Mapping, short: bool = False) -> str:
        """How the answers were asked for, from an `eval` config (a run's config.yaml, or `asdict(EvalConfig)`);
        `short`: the terminal's form, without the stops."""
        k = ecfg["num_fewshot"]
        if self.lm_eval:
            stops = ", ".join(f"`{s}`" for s in LM_EVAL_STOPS)
            form = "--apply_chat_template --fewshot_as_multiturn" if self.chat else "plain text"
            text = f"lm-eval `gsm8k`, {k}-shot, {form}, greedy, {LM_EVAL_MAX_NEW_TOKENS} new tokens"
            return text if short else (f"{text}, stop at {stops} or EOS; a prompt longer than the model's context "
                                       f"less {LM_EVAL_MAX_NEW_TOKENS} tokens loses its start, as lm-eval cuts it")
        samples = ecfg["num_samples"]
        sampling = (f"{samples} samples at temperature {ecfg['temperature']} (maj@{samples}, pass@{samples})"
                    if samples > 1 else "greedy")
        head = (f"{k}-shot chat (worked examples as earlier turns)" if self.shots_as_turns
                else "zero-shot (the training prompt)")
        text = f"{head}, {sampling}, at most {ecfg.get('max_new_tokens')} new tokens"
        return text if short else (f"{text}, stop at EOS, end of turn, a complete `#### N` line or the model's "
                                   f"last position; a prompt that fills the context is not answered")

    def context_problem(self, context: int | None, max_new_tokens: int) -> str | None:
        """A model too short for lm-eval's protocols (lm-eval asserts the same): ConfigError's text."""
        if not self.lm_eval or lm_eval_max_length(context) > max_new_tokens:
            return None
        return (f"eval.prompt={self.name} is invalid for this model: its context of {context} positions leaves no "
                f"room for a prompt beside lm-eval's {max_new_tokens} new tokens; allowed: a model with more "
                f"positions, or eval.prompt=zero_shot_cot or fewshot")

    def fixed_problem(self, typed: Iterable[str]) -> str | None:
        """A setting typed on the command line that this protocol would replace: refused (ConfigError's text)."""
        key = next((k for k in LM_EVAL_FIXED if k in typed), None) if self.lm_eval else None
        if key is None:
            return None
        fixed = f"at most {LM_EVAL_MAX_NEW_TOKENS} new tokens" if key == "eval.max_new_tokens" else "its own stops"
        return (f"{key} is invalid with eval.prompt={self.name}: lm-eval's gsm8k task generates {fixed}, so the "
                f"value would be ignored; allowed: leave {key} unset, or eval.prompt=zero_shot_cot or fewshot")


ZERO_SHOT_COT = Protocol("zero_shot_cot", lm_eval=False, chat=True, shots_as_turns=False)
FEWSHOT = Protocol("fewshot", lm_eval=False, chat=True)
LM_EVAL_GSM8K = Protocol("lm_eval_gsm8k", lm_eval=True, chat=True)
LM_EVAL_GSM8K_PLAIN = Protocol("lm_eval_gsm8k_plain", lm_eval=True, chat=False)
PROTOCOLS = {p.name: p for p in (ZERO_SHOT_COT, FEWSHOT, LM_EVAL_GSM8K, LM_EVAL_GSM8K_PLAIN)}


def get(name: str) -> Protocol:
    """The protocol `eval.prompt` names (validated with the config, so a bad name never gets here)."""
    return PROTOCOLS[name]


def describe(ecfg: Mapping, short: bool = False) -> str:
    return get(ecfg["prompt"]).describe(ecfg, short)


def context_length(config, tokenizer) -> int | None:
    """The positions a model reports, read as lm-eval reads them (`resolve_max_length`): its config's (its text
    model's, where it nests one), else its tokenizer's `model_max_length`; None where neither says."""
    config = getattr(config, "text_config", None) or config
    for attr in CONTEXT_CONFIG_ATTRS:
        if (value := getattr(config, attr, None)) is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    return None if length is None or length == TOKENIZER_INFINITY else int(length)


def lm_eval_max_length(context: int | None) -> int:
    """lm-eval's `max_length` of a model whose context is `context` (`context_length`): 2048 where it reports none."""
    return LM_EVAL_DEFAULT_MAX_LENGTH if context is None else context


def lm_eval_stop_sequences(eos_token: str | None) -> list[str]:
    """The stop list lm-eval generates with: the task's `until`, plus the EOS string if not already in it."""
    stops = list(LM_EVAL_STOPS)
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
