"""Answers generated with continuous batching are the answers `model.generate`'s padded batches give, under
every protocol's stops, with questions joining the batch as others leave it."""

import dataclasses

import pytest

from gsm8k_lora.config import ENGINES
from gsm8k_lora.data import synthetic
from gsm8k_lora.data.loading import build_splits, shot_pool
from gsm8k_lora.evaluation.answers import pick_shots
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.preflight import CUDA_ENGINES
from tests.conftest import compose, load_tiny, requires_cuda

# every answer engine; those made for a GPU (`preflight.CUDA_ENGINES`) where there is one
ENGINE_PARAMS = [pytest.param(e, marks=[pytest.mark.gpu, requires_cuda]) if e in CUDA_ENGINES else e for e in ENGINES]


@pytest.fixture(scope="module")
def smoke(tiny):
    """The smoke experiment's config and the tiny model, on the GPU where there is one (as a run answers)."""
    from gsm8k_lora.model.loading import to_device

    model, tokenizer = tiny
    return compose("experiment=smoke"), to_device(model), tokenizer


@pytest.mark.parametrize("engine", [e for e in ENGINE_PARAMS if e != "slots"])
@pytest.mark.parametrize("overrides", [
    [],  # zero-shot: stops at EOS, a new turn's marker, or a complete `#### N` line
    ["eval.stop_sequences=[pencils]"],  # a stop string of the user's
    ["eval.prompt=lm_eval_gsm8k_plain", "eval.num_fewshot=2"],  # lm-eval's stops, limit and truncation
])
def test_every_engine_gives_the_greedy_answers_of_the_slot_loop(smoke, slot_answers, overrides, engine):
    _, model, tokenizer = smoke
    ecfg, prompts, slots = slot_answers(tuple(overrides))
    assert generate(model, tokenizer, prompts, dataclasses.replace(ecfg, engine=engine)) == slots


@pytest.fixture(scope="module")
def slot_answers(smoke):
    """(eval config, prompts, the slot loop's answers) of 12 test questions through 5 slots (7 join as others
    leave), for a protocol's overrides; answered once each."""
    cfg, model, tokenizer = smoke
    splits, done = build_splits(cfg.data), {}

    def answers(overrides: tuple[str, ...]):
        if overrides not in done:
            ecfg = dataclasses.replace(compose("experiment=smoke", *overrides).eval, batch_size=5, max_new_tokens=48)
            rows = splits.test.select(range(12)).to_list()
            shots = pick_shots(shot_pool(splits, ecfg.split), ecfg, len(rows))
            prompts = [build_prompt(tokenizer, r["question"], ecfg, s, None) for r, s in zip(rows, shots, strict=True)]
            slots = generate(model, tokenizer, prompts, ecfg)
            lengths = [o["generated_tokens"][0] for o in slots]
            assert len(set(lengths)) > 1 and max(lengths) <= 48  # rows stopped at different steps
            done[overrides] = ecfg, prompts, slots
        return done[overrides]

    return answers


def test_sampled_answers_are_the_same_for_the_same_seed(smoke):
    _, model, tokenizer = smoke
    ecfg = dataclasses.replace(compose("experiment=smoke", "eval.num_samples=3", "eval.temperature=1.0").eval,
                               batch_size=4, max_new_tokens=24)
    prompts = [build_prompt(tokenizer, r["question"], ecfg, [], None) for r in synthetic.generate(5, seed=9)]
    first, again = generate(model, tokenizer, prompts, ecfg), generate(model, tokenizer, prompts, ecfg)
    assert first == again and all(len(o["completions"]) == 3 for o in first)
    assert any(len(set(o["completions"])) > 1 for o in first)  # sampled, not three copies of one answer


def test_answers_in_another_dtype_run_a_copy_in_that_dtype_after_training_patched_the_model(tiny_model_dir):
    """SFTTrainer sets TRL's fused LM head as the model's forward, closing over the model's own: a copy made for
    bfloat16 answers must not call back into the float32 original (it did: bf16 answers equal to float32 ones)."""
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from gsm8k_lora.evaluation.generation import in_dtype
    from gsm8k_lora.training.sft import build_lora_config

    cfg = compose("experiment=smoke")
    model, _ = load_tiny()
    add_fused_lm_head(model)  # as SFTTrainer does, before PEFT wraps the model
    model = get_peft_model(model, build_lora_config(cfg.lora))
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        own = model(input_ids=ids).logits
        with in_dtype(model, torch.bfloat16) as half:
            assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
            logits = half(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16 and not torch.equal(logits.float(), own)
        assert model(input_ids=ids, fused_lm_head=False).logits.dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_greedy_answers_do_not_depend_on_the_batch_or_the_queue(smoke, engine):
    """Every row stops at its first stop token, the first generated token included, whether it was in the first
    fill of the slots or joined the batch later. The tiny model was pretrained on `question\\nsolution<EOS>`, so a
    prompt that is already a whole worked solution has EOS as its first greedy token."""
    import torch

    from gsm8k_lora.data.gsm8k import parse_answer
    from gsm8k_lora.evaluation import engines
    from gsm8k_lora.evaluation.generation import requests, stop_token_ids

    _, model, tokenizer = smoke
    ecfg = dataclasses.replace(compose("experiment=smoke").eval, max_new_tokens=24)
    rows = synthetic.generate(8, seed=5)
    chat = [build_prompt(tokenizer, r["question"], ecfg, [], None) for r in rows[:4]]
    worked = [r["question"] + "\n" + parse_answer(r["answer"]).solution for r in rows[4:]]
    prompts = [p for pair in zip(chat, worked, strict=True) for p in pair]  # stop-first rows all through the queue
    with torch.no_grad():
        first = [model(torch.tensor([tokenizer(p).input_ids])).logits[0, -1].argmax().item() for p in worked]
    assert set(first) == {tokenizer.eos_token_id}  # the rows this test is about exist

    def answers(batch_size: int) -> list[list[int]]:
        return engines.run(engine, model, requests(tokenizer, prompts, ecfg), batch_size, ecfg.max_new_tokens,
                           set(stop_token_ids(tokenizer)), tokenizer.pad_token_id, None, lambda n: None)

    alone, between, all_at_once = answers(1), answers(3), answers(len(prompts) + 5)
    assert alone == between == all_at_once
    assert [alone[i] for i in range(1, len(prompts), 2)] == [[tokenizer.eos_token_id]] * 4
    assert all(len(alone[i]) > 1 for i in range(0, len(prompts), 2))


def test_answers_of_the_merged_adapter_are_those_of_the_adapter(smoke):
    """`eval.merge_adapter`: a copy with the LoRA folded into the weights answers as the adapter does (float32), and
    the trained model keeps its adapter."""
    import torch
    from peft import get_peft_model

    from gsm8k_lora.evaluation.generation import merged
    from gsm8k_lora.training.sft import build_lora_config

    cfg, _, tokenizer = smoke
    model, _ = load_tiny()
    model = get_peft_model(model, build_lora_config(cfg.lora))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (the adapter a no-op): give it something to merge
            param.data.normal_(std=0.05)
    ecfg = dataclasses.replace(cfg.eval, max_new_tokens=32)
    prompts = [build_prompt(tokenizer, r["question"], ecfg, [], None) for r in synthetic.generate(6, seed=3)]
    adapter = generate(model, tokenizer, prompts, ecfg)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, ecfg)
    with merged(model) as folded:
        assert not any("lora_" in name for name, _ in folded.named_parameters())
        assert generate(folded, tokenizer, prompts, ecfg) == adapter != base
    assert any("lora_" in name for name, _ in model.named_parameters())


@pytest.fixture(scope="module")
def near_the_end(smoke):
    """(eval config, prompts, the room each leaves before the tiny model's last position): training-protocol prompts
    made long by a system prompt of generated GSM8K questions, leaving room to spare, 5 tokens, 2, none, and less."""
    cfg, model, tokenizer = smoke
    ecfg = dataclasses.replace(cfg.eval, max_new_tokens=32, batch_size=2)
    positions = model.config.max_position_embeddings
    filler = tokenizer(" ".join(r["question"] for r in synthetic.generate(120, seed=4))).input_ids

    def leaving(room: int) -> str:
        def prompt(n: int) -> str:
            return build_prompt(tokenizer, "What is 2 + 3?", ecfg, [], tokenizer.decode(filler[:n]))

        guess, wanted = positions - room - len(tokenizer(prompt(0)).input_ids), positions - room
        found = [p for n in range(guess - 8, guess + 8) if len(tokenizer(p := prompt(n)).input_ids) == wanted]
        assert found, f"no prompt leaves {room} tokens"
        return found[0]

    rooms = [60, 5, 2, 0, -3]
    return ecfg, [leaving(room) for room in rooms], rooms


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_no_token_is_generated_past_the_model_s_last_position(smoke, near_the_end, engine):
    """The package's own protocols never cut a prompt: an answer stops at the context's end, with the tokens it would
    have written there, and a prompt that leaves no room is not answered; under every engine."""
    from gsm8k_lora.evaluation import engines
    from gsm8k_lora.evaluation.generation import completion, requests, stop_token_ids

    _, model, tokenizer = smoke
    ecfg, prompts, rooms = near_the_end
    out = generate(model, tokenizer, prompts, dataclasses.replace(ecfg, engine=engine))
    unbounded = engines.run("slots", model, requests(tokenizer, prompts, ecfg), 2, ecfg.max_new_tokens,
                            set(stop_token_ids(tokenizer)), tokenizer.pad_token_id, None, lambda n: None)
    spare, *bounded, no_room, less = zip(rooms, out, unbounded, strict=True)
    assert spare[1]["generated_tokens"] == [len(spare[2])] < [spare[0]]  # it stopped on its own, as without a bound
    assert spare[1]["stopped_at_context_end"] == [False]
    for room, answer, free in bounded:
        assert len(free) > room  # the case: unbounded, it writes past the model's last position
        assert answer["generated_tokens"] == [room] and answer["stopped_at_context_end"] == [True]
        assert answer["completions"] == [completion(tokenizer, free[:room], ecfg)]
    for _, answer, _ in (no_room, less):
        assert answer == {"completions": [""], "generated_tokens": [0], "prompt_tokens_cut": 0,
                          "stopped_at_context_end": [False], "prompt_did_not_fit": True, "process": 0}
    assert all(answer["prompt_tokens_cut"] == 0 for answer in out)  # the training prompt is never cut
