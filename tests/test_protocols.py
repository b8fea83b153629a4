"""lm-eval's `gsm8k` protocol: prompts, shot selection, stop sequences.

The expected strings in the hand-written tests were written from reading lm-eval 0.4.13's code (`fewshot_context`
and `build_qa_turn` in `lm_eval/api/task.py`, `Message` in `lm_eval/api/utils.py`); the shot indices are what
its sampler draws. When `lm_eval` is importable, the last tests rebuild the prompts with lm-eval's own task,
from its own YAML, and compare them with ours string for string.
"""

from __future__ import annotations

import pytest

from gsm8k_lora.data import synthetic
from gsm8k_lora.evaluation.protocols import (
    LM_EVAL_GSM8K,
    LM_EVAL_GSM8K_PLAIN,
    LM_EVAL_STOPS,
    PROTOCOLS,
    context_length,
    lm_eval_chat_messages,
    lm_eval_chat_prompt,
    lm_eval_max_length,
    lm_eval_plain_prompt,
    lm_eval_shots,
    lm_eval_stop_sequences,
    lm_eval_truncate,
)
from tests.conftest import load_tiny_tokenizer
from tests.test_lm_eval_parity import SKIP_REASON, lm_eval_gsm8k_task

# SmolLM2-Instruct's ChatML template: it writes its own system prompt when the messages have none.
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
POOL = [{"question": f"Row {i} has {i} pens. How many?", "answer": f"It has <<{i}={i}>>{i}.\n#### {i}"}
        for i in range(6)]
QUESTIONS = ["Ann has 2 pens and buys 3 more. How many?", "Bo had 9 cards and lost 4. How many are left?"]


@pytest.fixture
def tokenizers(tiny_model_dir) -> dict:
    """The tiny model's tokenizer with its Falcon3-style template, and one with a ChatML template like SmolLM2's."""
    chatml = load_tiny_tokenizer()
    chatml.chat_template = CHATML_DEFAULT_SYSTEM
    return {"falcon3_style": load_tiny_tokenizer(), "chatml": chatml}


def test_shots_are_lm_eval_sampler_draws_in_question_order():
    # lm-eval's ContextSampler with seed 1234 over the 7,473-row train split: one draw per question, in order.
    shots = lm_eval_shots([{"i": i} for i in range(7473)], num_questions=2)
    assert [[s["i"] for s in draw] for draw in shots] == [[6374, 3610, 957, 61, 742], [7462, 6610, 4769, 286, 5501]]
    assert [[s["i"] for s in draw] for draw in lm_eval_shots([{"i": i} for i in range(6)], 2, 2)] == [[3, 0], [0, 5]]
    assert lm_eval_shots(POOL, 2, num_fewshot=0) == [[], []]


def test_plain_prompts_for_two_questions():
    shots = lm_eval_shots(POOL, num_questions=2, num_fewshot=2)  # rows 3, 0, then rows 0, 5
    prompts = [lm_eval_plain_prompt(q, s) for q, s in zip(QUESTIONS, shots, strict=True)]
    assert prompts[0] == ("Question: Row 3 has 3 pens. How many?\nAnswer: It has <<3=3>>3.\n#### 3\n\n"
                          "Question: Row 0 has 0 pens. How many?\nAnswer: It has <<0=0>>0.\n#### 0\n\n"
                          "Question: Ann has 2 pens and buys 3 more. How many?\nAnswer:")
    assert prompts[1] == ("Question: Row 0 has 0 pens. How many?\nAnswer: It has <<0=0>>0.\n#### 0\n\n"
                          "Question: Row 5 has 5 pens. How many?\nAnswer: It has <<5=5>>5.\n#### 5\n\n"
                          "Question: Bo had 9 cards and lost 4. How many are left?\nAnswer:")
    # A system instruction is glued on with no separator; zero shots leave the bare question.
    assert lm_eval_plain_prompt("Q?", [], system_instruction="Be brief.") == "Be brief.Question: Q?\nAnswer:"


def test_chat_prompts_for_two_questions(tokenizers):
    shots = lm_eval_shots(POOL, num_questions=2, num_fewshot=2)
    falcon3 = [lm_eval_chat_prompt(tokenizers["falcon3_style"], q, s) for q, s in zip(QUESTIONS, shots, strict=True)]
    # Each shot: a user turn ending at `Answer:` (no target delimiter) and an assistant turn holding the bare answer.
    assert falcon3[0] == ("<|user|>\nQuestion: Row 3 has 3 pens. How many?\nAnswer:\n"
                          "<|assistant|>\nIt has <<3=3>>3.\n#### 3<|endoftext|>\n"
                          "<|user|>\nQuestion: Row 0 has 0 pens. How many?\nAnswer:\n"
                          "<|assistant|>\nIt has <<0=0>>0.\n#### 0<|endoftext|>\n"
                          "<|user|>\nQuestion: Ann has 2 pens and buys 3 more. How many?\nAnswer:\n<|assistant|>\n")
    assert falcon3[1].startswith("<|user|>\nQuestion: Row 0 has 0 pens.")
    assert falcon3[1].endswith("<|user|>\nQuestion: Bo had 9 cards and lost 4. How many are left?\nAnswer:\n"
                               "<|assistant|>\n")
    # No system message is sent, so a template's own default system prompt applies, as in lm-eval.
    chatml = lm_eval_chat_prompt(tokenizers["chatml"], QUESTIONS[1], shots[1][:1])
    assert chatml == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nQuestion: Row 0 has 0 pens. How many?\nAnswer:<|im_end|>\n"
                      "<|im_start|>assistant\nIt has <<0=0>>0.\n#### 0<|im_end|>\n"
                      "<|im_start|>user\nQuestion: Bo had 9 cards and lost 4. How many are left?\nAnswer:<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_single_turn_chat_puts_the_plain_prompt_in_one_user_turn():
    messages = lm_eval_chat_messages("Q?", POOL[:1], system_instruction="Be brief.", fewshot_as_multiturn=False)
    assert messages == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": lm_eval_plain_prompt("Q?", POOL[:1])}]


def test_each_eval_prompt_name_is_its_protocol():
    assert {name: (p.name, p.lm_eval, p.chat) for name, p in PROTOCOLS.items()} == {
        "zero_shot_cot": ("zero_shot_cot", False, True), "fewshot": ("fewshot", False, True),
        "lm_eval_gsm8k": ("lm_eval_gsm8k", True, True),  # TII's setting: --apply_chat_template
        "lm_eval_gsm8k_plain": ("lm_eval_gsm8k_plain", True, False)}
    assert (LM_EVAL_GSM8K, LM_EVAL_GSM8K_PLAIN) == (PROTOCOLS["lm_eval_gsm8k"], PROTOCOLS["lm_eval_gsm8k_plain"])


def test_generation_settings_and_stop_sequences():
    for protocol in (LM_EVAL_GSM8K, LM_EVAL_GSM8K_PLAIN):
        assert protocol.token_limit(512) == 256 and not protocol.stops_at_answer_line
        assert protocol.stops("<|im_end|>", ["ignored"]) == list(LM_EVAL_STOPS) == ["Question:", "</s>", "<|im_end|>"]
    assert PROTOCOLS["fewshot"].token_limit(512) == 512 and PROTOCOLS["fewshot"].stops("</s>", ["x"]) == ["x"]
    assert lm_eval_stop_sequences("<|endoftext|>")[-1] == "<|endoftext|>"
    assert lm_eval_stop_sequences("<|im_end|>") == list(LM_EVAL_STOPS)
    assert lm_eval_truncate("So 18.\n#### 18\n\nQuestion: next<|im_end|>", LM_EVAL_STOPS) == "So 18.\n#### 18\n\n"
    assert lm_eval_truncate("no stop here", ["", "</s>"]) == "no stop here"


def test_a_setting_an_lm_eval_protocol_would_ignore_is_refused_once_typed():
    problem = LM_EVAL_GSM8K.fixed_problem(["eval.limit", "eval.max_new_tokens"])
    assert problem.startswith("eval.max_new_tokens is invalid with eval.prompt=lm_eval_gsm8k") and "256" in problem
    assert LM_EVAL_GSM8K_PLAIN.fixed_problem(["eval.stop_sequences"]).startswith("eval.stop_sequences is invalid")
    assert LM_EVAL_GSM8K.fixed_problem(["eval.limit"]) is None
    assert PROTOCOLS["zero_shot_cot"].fixed_problem(["eval.max_new_tokens"]) is None


# A model's context, as configs and tokenizers say it (SimpleNamespace stands in for both): what the package reads
# (`context_length`), and lm-eval's `max_length` (2048 where nothing says).
CONTEXTS = [
    ({"max_position_embeddings": 1024}, 4096, 1024, 1024),  # the config first
    ({"n_positions": 512, "max_position_embeddings": 1024}, None, 512, 512),  # GPT-2's name first
    ({"n_ctx": 300}, None, 300, 300),
    ({"text_config": {"max_position_embeddings": 8192}, "max_position_embeddings": 1200}, None, 8192, 8192),
    ({}, 4096, 4096, 4096),  # then the tokenizer
    ({}, int(1e30), None, 2048),  # a tokenizer that sets no length: lm-eval's default
    ({}, None, None, 2048),
]


def namespace(config: dict):
    from types import SimpleNamespace

    return SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v for k, v in config.items()})


@pytest.mark.parametrize("config, tokenizer_length, context, lm_eval_length", CONTEXTS)
def test_the_model_s_context_is_read_as_lm_eval_reads_it(config, tokenizer_length, context, lm_eval_length):
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(model_max_length=tokenizer_length)
    assert context_length(namespace(config), tokenizer) == context
    assert lm_eval_max_length(context) == lm_eval_length


@pytest.mark.parametrize("config, tokenizer_length, context, lm_eval_length", CONTEXTS)
def test_lm_eval_s_own_max_length_is_the_one_read(config, tokenizer_length, context, lm_eval_length):
    pytest.importorskip("lm_eval.models.utils", reason=SKIP_REASON)
    from types import SimpleNamespace

    from lm_eval.models.utils import resolve_max_length

    assert resolve_max_length(namespace(config), SimpleNamespace(model_max_length=tokenizer_length)) == lm_eval_length


def test_a_prompt_is_fitted_to_the_context_by_its_protocol():
    ids = list(range(1, 801))  # 800 tokens, the first one a BOS
    for protocol in (LM_EVAL_GSM8K, LM_EVAL_GSM8K_PLAIN):  # lm-eval's: the last 1024 - 256 = 768 tokens kept
        fit = protocol.fit(ids, 1024, 256)
        assert (fit.ids, fit.cut, fit.room) == (ids[32:], 32, 256)
        assert protocol.fit(ids, 2000, 256).cut == 0 and protocol.fit(ids, None, 256).ids == ids  # 2048 - 256 fit
        assert protocol.fit(ids, None, 256).room is None
        assert protocol.context_problem(256, 256).startswith(f"eval.prompt={protocol.name} is invalid for this model")
        assert protocol.context_problem(257, 256) is None and protocol.context_problem(None, 256) is None
    for name in ("zero_shot_cot", "fewshot"):  # the package's own: never cut; the room is what the context leaves
        protocol = PROTOCOLS[name]
        assert [(f.ids == ids, f.cut, f.room) for f in (protocol.fit(ids, n, 320) for n in (1024, 810, 800, 700))] == [
            (True, 0, 224), (True, 0, 10), (True, 0, 0), (True, 0, -100)]
        assert protocol.fit(ids, None, 320).room is None and protocol.context_problem(10, 320) is None


# --- Against lm-eval's own code -------------------------------------------------------------------------------

LM_EVAL_FEWSHOT = 5  # the gsm8k task's num_fewshot
TRAIN = [{"question": r["question"], "answer": r["answer"]} for r in synthetic.generate(7473, seed=0)]
TEST = [{"question": r["question"], "answer": r["answer"]} for r in synthetic.generate(3, seed=1)]


def hf_chat_template(tokenizer):
    """lm-eval's HF wrapper's `apply_chat_template`, without loading a model."""
    def render(chat_history, add_generation_prompt=True):
        return tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)
    return render


def lm_eval_contexts(tokenizer=None, fewshot_as_multiturn=False, system_instruction=None) -> list[tuple]:
    """lm-eval's own requests for TEST: (prompt, generation kwargs) per question."""
    task = lm_eval_gsm8k_task(TRAIN, TEST)
    chat = {"apply_chat_template": True, "fewshot_as_multiturn": fewshot_as_multiturn,
            "chat_template": hf_chat_template(tokenizer)} if tokenizer is not None else {}
    task.build_all_requests(system_instruction=system_instruction, **chat)
    return [instance.arguments for instance in task.instances]


@pytest.mark.parametrize("system_instruction", [None, "Solve it."])
def test_plain_prompt_is_lm_eval_s(system_instruction):
    theirs = lm_eval_contexts(system_instruction=system_instruction)
    shots = lm_eval_shots(TRAIN, len(TEST), LM_EVAL_FEWSHOT)
    for (prompt, gen_kwargs), row, row_shots in zip(theirs, TEST, shots, strict=True):
        assert prompt == lm_eval_plain_prompt(row["question"], row_shots, system_instruction)
        assert gen_kwargs["until"] == list(LM_EVAL_STOPS)
        assert gen_kwargs["do_sample"] is False  # greedy


@pytest.mark.parametrize("template, multiturn, system_instruction", [
    ("falcon3_style", True, None), ("chatml", True, None), ("chatml", True, "Solve it."),
    ("falcon3_style", False, None),
])
def test_chat_prompt_is_lm_eval_s(tokenizers, template, multiturn, system_instruction):
    tokenizer = tokenizers[template]
    theirs = lm_eval_contexts(tokenizer, multiturn, system_instruction)
    shots = lm_eval_shots(TRAIN, len(TEST), LM_EVAL_FEWSHOT)
    for (prompt, _), row, row_shots in zip(theirs, TEST, shots, strict=True):
        assert prompt == lm_eval_chat_prompt(tokenizer, row["question"], row_shots, system_instruction, multiturn)


def test_generation_defaults_and_stop_handling_are_lm_eval_s():
    pytest.importorskip("lm_eval.models.utils", reason=SKIP_REASON)
    from lm_eval.defaults import DEFAULT_MAX_GEN_TOKS
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    assert DEFAULT_MAX_GEN_TOKS == LM_EVAL_GSM8K.token_limit(512)  # the task's YAML sets no max_gen_toks
    for eos in ("<|endoftext|>", "<|im_end|>", None):
        stops = lm_eval_stop_sequences(eos)
        assert stops == handle_stop_sequences(list(LM_EVAL_STOPS), eos=eos)
        for text in ("a</s>b Question: c", "#### 5<|endoftext|>x", "plain", "Question:Question:"):
            assert lm_eval_truncate(text, stops) == postprocess_generated_text(text, stops, think_end_token=None)
