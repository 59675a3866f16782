"""llm_train/engine.py, the one generation engine: stop tokens, validated sampling settings, the context window,
batches and streaming give the same tokens as a direct generate() call (greedy), on the tiny GPT-2 of conftest."""
import math

from llm_train.engine import GREEDY, Engine, Sampling, new_token_count, stop_token_ids
from llm_train.errors import UserError
from llm_train.runtime import autocast
from llm_train.tokenizer import EOT, IM_END, load_chat_tokenizer

import pytest


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return Engine(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(), load_chat_tokenizer(tiny_model_dir))


@pytest.mark.parametrize("settings, what", [((math.nan, 0, 1.0), "temperature"), ((-0.1, 0, 1.0), "temperature"),
                                            ((math.inf, 0, 1.0), "temperature"), ((1.0, math.nan, 1.0), "top_k"),
                                            ((1.0, -1, 1.0), "top_k"), ((1.0, 2.5, 1.0), "top_k"),
                                            ((1.0, 0, math.nan), "top_p"), ((1.0, 0, 0.0), "top_p"),
                                            ((1.0, 0, 1.5), "top_p"), ((None, 0, 1.0), "temperature")])
def test_bad_sampling_settings_are_a_clear_error(settings, what):
    with pytest.raises(UserError, match=f"^{what} must be"):
        Sampling(*settings)


def test_sampling_settings():
    assert GREEDY.greedy and GREEDY.generate_kwargs() == dict(do_sample=False, temperature=None, top_k=None,
                                                              top_p=None)
    s = Sampling(0.7, 50.0, 0.95)  # slider values come as floats
    assert s.top_k == 50 and isinstance(s.top_k, int)
    kwargs = s.generate_kwargs()  # drawn by our processors under greedy decoding: generate()'s own warpers stay off
    assert {k: v for k, v in kwargs.items() if k != "logits_processor"} == GREEDY.generate_kwargs()
    assert [(type(p).__name__, vars(p)) for p in kwargs["logits_processor"]][:3] == [
        ("TemperatureLogitsWarper", {"temperature": 0.7}),
        ("TopKLogitsWarper", {"top_k": 50, "filter_value": -math.inf, "min_tokens_to_keep": 1}),
        ("TopPLogitsWarper", {"top_p": 0.95, "filter_value": -math.inf, "min_tokens_to_keep": 1})]
    # 0 = off, not generate()'s default of 50
    assert [type(p).__name__ for p in Sampling(1.0, 0, 1.0).generate_kwargs()["logits_processor"]] == [
        "TemperatureLogitsWarper", "InverseCdfDraw"]
    assert new_token_count(64.0) == 64
    for bad in (math.nan, 0, 2.5, "x"):
        with pytest.raises(UserError, match="max_new_tokens must be"):
            new_token_count(bad)


def test_stop_tokens_and_context(engine):
    tok = engine.tokenizer
    assert engine.stops == stop_token_ids(tok) == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)]
    ids = list(range(10, 10 + 300))
    assert engine.fit(ids, 56) == ids[-200:]  # n_positions 256: the prompt keeps its end
    assert engine.cut_at_stop([5, 6, engine.stops[0], 7]) == [5, 6, engine.stops[0]]


def test_greedy_is_the_direct_generate_call_token_for_token(engine):
    import torch

    tok = engine.tokenizer
    prompts = [tok("The quick brown fox").input_ids, tok("你好").input_ids]
    direct = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = engine.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                    eos_token_id=engine.stops, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        direct.append(engine.cut_at_stop(out))
    assert engine.generate_batch(prompts, 12) == direct  # left-padded batch
    for ids, expected in zip(prompts, direct):
        streamed = list(engine.stream(ids, 12))
        assert streamed == expected
        texts = list(engine.stream_text(ids, 12))
        assert texts[-1] == (engine.decode(expected), len(expected))
        assert all(b[0].startswith(a[0]) for a, b in zip(texts, texts[1:]))


def test_a_batch_whose_rows_stop_at_different_steps_matches_generate_row_for_row():
    """decode_batch drops stopped rows from the batch and its KV cache: when the rows of a left-padded batch stop at
    different steps, each reply is still what a one-row generate() call gives. (A GPT-2 with large random weights:
    its greedy replies vary.)"""
    import torch

    model = _random_gpt2()
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (3, 9, 5, 12, 4, 7, 6, 10)]
    free = Engine(model, None, stops=[]).generate_batch(prompts, 16)
    stops = sorted({reply[2 + 2 * i] for i, reply in enumerate(free[:6])})  # each of 6 rows stops by its own step
    engine = Engine(model, None, stops=stops)
    direct = _generate_each(model, prompts, 16, stops)
    assert len({len(reply) for reply in direct}) >= 4 and min(map(len, direct)) <= 4  # rows leave the batch early
    assert engine.generate_batch(prompts, 16) == direct
    # sampled, the batch as one generate() call makes it, from the same seed: the same tokens
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
    sampling = Sampling(1.0, 0, 0.9)
    torch.manual_seed(7)
    one_call = [engine.cut_at_stop(row) for row in engine.generate(input_ids, 16, sampling, mask).tolist()]
    torch.manual_seed(7)
    assert engine.generate_batch(prompts, 16, sampling) == one_call
    assert one_call != direct and len({len(reply) for reply in one_call}) >= 3


def _random_gpt2(seed=0, **sizes):
    """A GPT-2 with large random weights: its greedy replies vary (the tiny model of conftest repeats one token)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **sizes})).eval()


def _generate_each(model, prompts, max_new_tokens, stops):
    """Each prompt's greedy reply from its own generate() call (no padding), cut after its stop token."""
    import torch

    engine = Engine(model, None, stops=stops)
    direct = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stops or None, pad_token_id=0)[0, len(ids):].tolist()
        direct.append(engine.cut_at_stop(out))
    return direct


def test_the_batch_loop_runs_lora_and_a_scaled_final_norm_and_computes_a_repeated_prompt_once():
    """GRPO samples from a PeftModel (LoRA on the projections, the final norm a trained ScaledLayerNorm copy) and
    repeats each prompt for its group: the batch loop's replies are those of generate() on that very model, the
    repeated prompts' included; and they differ from the plain model's, so the LoRA and the scale took part."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_train.grpo import add_logit_scale

    plain = _random_gpt2(seed=1)
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 5)]
    prompts = [p for p in prompts for _ in range(3)] + [prompts[1]]  # groups, and a prompt once more on its own
    before = Engine(plain, None, stops=[]).generate_batch(prompts, 12)
    model = add_logit_scale(_random_gpt2(seed=1))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                             fan_in_fan_out=True, modules_to_save=["ln_f"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
            if name.endswith("log_scale"):
                param.fill_(0.7)
    model.eval()
    replies = Engine(model, None, stops=[]).generate_batch(prompts, 12)
    assert replies == _generate_each(model, prompts, 12, [])
    assert replies[:3] == [replies[0]] * 3 and replies[-1] == replies[3]
    assert replies != before


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_batch_loop_computes_what_the_models_forward_does(dtype):
    """The batch loop's logits at each step equal one forward pass of the model over the prompt and the tokens so far
    (left padding, position ids from the first real token), in fp32 to float rounding and under bf16 autocast to
    bf16's (its attention is eager attention in the cache's dtype, the forward's is SDPA)."""
    import torch

    from llm_train.engine import GPT2Decoder

    model = _random_gpt2(seed=2, n_layer=3)
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4, 11, 7)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    tokens = torch.randint(1, 300, (3, 6), generator=torch.Generator().manual_seed(0))
    decoder = GPT2Decoder(model, width + tokens.shape[1])
    tolerance = 1e-4 if dtype == "fp32" else 0.02
    with torch.no_grad(), autocast("cpu", dtype):
        steps = [decoder.prefill(ids, mask)]
        position = mask.sum(-1) - 1
        for j in range(tokens.shape[1] - 1):
            position = position + 1
            steps.append(decoder.step(tokens[:, j], position))
        for j, logits in enumerate(steps):
            full_ids = torch.cat([ids, tokens[:, :j]], 1)
            full_mask = torch.cat([mask, torch.ones_like(tokens[:, :j])], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, -1].float()
            scale = expected.abs().max()
            assert (logits - expected).abs().max() <= tolerance * scale, (j, (logits - expected).abs().max(), scale)


def test_the_batch_loop_is_for_gpt2():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError, match="GPT-2 models .* got a llama model"):
        Engine(model, None, stops=[]).decode_batch(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), 4)


def test_sampled_streams_match_sampled_batches(engine):
    import torch

    ids = engine.tokenizer("Once upon").input_ids
    sampling = Sampling(1.0, 20, 0.9)
    torch.manual_seed(3)
    batch = engine.generate_batch([ids], 16, sampling)[0]
    torch.manual_seed(3)
    assert list(engine.stream(ids, 16, sampling)) == batch


@pytest.mark.parametrize("settings", [(0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8)])
def test_sampling_draws_from_the_warped_softmax(settings):
    """Each row's token is drawn from softmax of the warped logits (temperature, then top-k, then top-p): the
    frequencies over 40,000 rows are within 5 sigma of the probabilities, and a token the warpers (or a -inf logit)
    rule out never comes. The one token left has score 0, every other -inf, so generate()'s argmax picks it."""
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    temperature, top_k, top_p = settings
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -math.inf]]).expand(40_000, -1).clone()
    warped = logits / temperature
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = torch.softmax(warped[0], -1)
    torch.manual_seed(0)
    scores = logits.clone()
    for processor in Sampling(*settings).generate_kwargs()["logits_processor"]:
        scores = processor(None, scores)
    assert ((scores == 0).sum(-1) == 1).all() and ((scores == 0) | (scores == -math.inf)).all()
    counts = torch.bincount(scores.argmax(-1), minlength=6).double()
    assert (counts[expected == 0] == 0).all() and (expected == 0).sum() >= 1
    sigma = (40_000 * expected * (1 - expected)).sqrt()
    assert ((counts - 40_000 * expected).abs() <= 5 * sigma + 1e-9).all(), (counts / 40_000, expected)


def test_autocast_takes_names_dtypes_or_the_run_default():
    import torch

    assert autocast("cpu", "fp32").__class__.__name__ == "nullcontext"
    assert autocast(torch.device("cpu"), torch.float32).__class__.__name__ == "nullcontext"
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    autocast("cpu")  # None: the run's compute dtype
