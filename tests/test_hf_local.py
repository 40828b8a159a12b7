"""attn_implementation="metalearner_local" (metalearner/model/hf_local.py) against HF's sdpa
path with the dense sliding-window mask: tiny random Qwen2, Mistral and Gemma 3, CPU, fp32,
window < sequence length; outputs and gradients (input embeddings and every parameter)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402

from metalearner.model import hf_local  # noqa: E402
from metalearner.model.hf_local import ATTN_NAME, register_local_attention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB, T, WINDOW = 97, 48, 8
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def qwen2(window: int) -> transformers.PretrainedConfig:
    # layer 0 full attention, layer 1 sliding: both paths of the function in one model
    return transformers.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=window, max_window_layers=1)


def mistral(window: int) -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**SIZES, sliding_window=window)


def gemma3(window: int) -> transformers.PretrainedConfig:
    # scaling = query_pre_attn_scalar ** -0.5, not head_dim ** -0.5: the kernel's scale is corrected
    return transformers.Gemma3TextConfig(**SIZES, head_dim=16, query_pre_attn_scalar=24, sliding_window=window,
                                         layer_types=["sliding_attention", "full_attention"])


FAMILIES = {"qwen2": (qwen2, "Qwen2ForCausalLM"), "mistral": (mistral, "MistralForCausalLM"),
            "gemma3": (gemma3, "Gemma3ForCausalLM")}


def build(family: str, window: int, attn: str, weights: dict | None = None) -> torch.nn.Module:
    make_config, cls = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)._from_config(make_config(window), attn_implementation=attn)
    if weights is not None:
        model.load_state_dict(weights)
    return model.float().train()


def layer_kinds(model: torch.nn.Module) -> list[str]:
    """Each layer's attention kind (Mistral has no `layer_types`: every layer slides)."""
    n = model.config.num_hidden_layers
    return getattr(model.config, "layer_types", None) or ["sliding_attention"] * n


def set_window(model: torch.nn.Module, window: int) -> None:
    """The run-time move: the config and every sliding-window layer (Mistral reads the config)."""
    model.config.sliding_window = window
    for layer, kind in zip(model.model.layers, layer_kinds(model), strict=True):
        if kind == "sliding_attention" and hasattr(layer.self_attn, "sliding_window"):
            layer.self_attn.sliding_window = window


def step(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Logits, d loss / d input embeddings, d loss / d every parameter."""
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb, use_cache=False, **kwargs).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach(), emb.grad, [p.grad for p in model.parameters()]


def assert_same(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)
    assert len(a[2]) == len(b[2])
    for ga, gb in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def band_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the band kernel's calls (the real kernel runs)."""
    calls: list[int] = []
    real = hf_local.blocked_local_attention

    def counted(q, k, v, window, causal):
        calls.append(window)
        return real(q, k, v, window, causal)

    monkeypatch.setattr(hf_local, "blocked_local_attention", counted)
    return calls


def test_register_returns_the_name_and_is_idempotent():
    assert register_local_attention() == ATTN_NAME == register_local_attention() == "metalearner_local"
    assert ATTN_NAME in transformers.AttentionInterface._global_mapping


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_and_gradients_equal_sdpa_with_the_dense_window_mask(family, ids, band_calls):
    register_local_attention()
    ref = build(family, WINDOW, "sdpa")
    local = build(family, WINDOW, ATTN_NAME, ref.state_dict())
    assert_same(step(local, ids), step(ref, ids))
    n_sliding = model_sliding_layers(local)
    assert band_calls == [WINDOW] * n_sliding  # the band ran, once per sliding layer, at the window

    wider = build(family, 2 * WINDOW, "sdpa", ref.state_dict())  # the comparison can fail
    assert (step(wider, ids)[0] - step(local, ids)[0]).abs().max() > 1e-3


def model_sliding_layers(model: torch.nn.Module) -> int:
    return layer_kinds(model).count("sliding_attention")


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_a_window_moved_at_run_time_still_equals_a_fresh_sdpa_model(family, ids, band_calls):
    register_local_attention()
    local = build(family, WINDOW, ATTN_NAME)
    weights = local.state_dict()
    for window in (5, 20, 3 * T):  # smaller, larger, beyond the sequence (plain causal)
        set_window(local, window)
        fresh = build(family, window, "sdpa", weights)
        assert_same(step(local, ids), step(fresh, ids))
    assert band_calls == [5] * model_sliding_layers(local) + [20] * model_sliding_layers(local)


def test_padding_falls_back_to_sdpa_with_the_mask_and_agrees(ids, band_calls):
    register_local_attention()
    ref = build("mistral", WINDOW, "sdpa")
    local = build("mistral", WINDOW, ATTN_NAME, ref.state_dict())
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    a, b = step(local, ids, attention_mask=mask), step(ref, ids, attention_mask=mask)
    assert_same(a, b)
    assert band_calls == []
    step(local, ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is no padding: the band
    assert band_calls == [WINDOW] * 2


def test_attention_dropout_falls_back_to_sdpa_with_the_window_and_agrees(ids, band_calls):
    register_local_attention()
    results = []
    for attn in ("sdpa", ATTN_NAME):
        make_config, _ = FAMILIES["mistral"]
        config = make_config(WINDOW)
        config.attention_dropout = 0.2
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM._from_config(config, attn_implementation=attn).train()
        torch.manual_seed(5)  # the same dropout draws in both
        results.append(step(model, ids))
    assert_same(results[1], results[0])
    assert band_calls == []


def test_no_dense_mask_is_built_unless_there_is_padding(ids):
    register_local_attention()
    model = build("qwen2", WINDOW, ATTN_NAME)
    emb = model.get_input_embeddings()(ids)
    args = dict(config=model.config, inputs_embeds=emb, cache=None)
    assert create_sliding_window_causal_mask(attention_mask=None, **args) is None
    assert create_causal_mask(attention_mask=torch.ones_like(ids), **args) is None
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    dense = create_sliding_window_causal_mask(attention_mask=padded, **args)
    assert dense is not None and dense.shape == (2, 1, T, T)
    assert not dense[1, 0, :, 0].any() and not dense[0, 0, -1, 0]  # padding and the window both in it


def test_the_band_follows_the_scaling_the_model_passes(ids, band_calls):
    register_local_attention()
    ref = build("mistral", WINDOW, "sdpa")
    local = build("mistral", WINDOW, ATTN_NAME, ref.state_dict())
    for model in (ref, local):
        for layer in model.model.layers:
            layer.self_attn.scaling = 0.61
    assert_same(step(local, ids), step(ref, ids))
    assert len(band_calls) == 2


def test_the_benchmark_quick_mode_runs(monkeypatch, capsys):
    # in this process (transformers is already imported here); the script sets the thread count
    spec = importlib.util.spec_from_file_location("bench_hf_window", ROOT / "benchmarks" / "bench_hf_window.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_hf_window.py", "--quick"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "metalearner_local: None" in out  # no T x T mask built for the band
    assert "RESULT hf_window: ratio=" in out


def test_generation_with_a_cache_gives_the_tokens_of_sdpa(band_calls):
    # the prompt (prefill) runs the band; each decoded token (key length > 1 query) goes to sdpa
    register_local_attention()
    ref = build("qwen2", WINDOW, "sdpa").eval()
    local = build("qwen2", WINDOW, ATTN_NAME, ref.state_dict()).eval()
    prompt = torch.randint(0, VOCAB, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    tokens = [m.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10) for m in (ref, local)]
    assert torch.equal(tokens[0], tokens[1])
    assert band_calls == [WINDOW]
