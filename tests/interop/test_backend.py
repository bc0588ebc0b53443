"""The "sparsemoe" experts implementation of transformers (skipped without transformers).

Each layout the ``@use_experts_implementation`` decorator describes is checked on a real
transformers experts class against a per-token loop written from the definition (float64
products around the model's gate function), and
whole models against transformers' own "eager" loop (tiny random configs, nothing
downloaded)."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.aria.modeling_aria import AriaExperts
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

import sparsemoe.interop
from sparsemoe.interop import backend, coverage

N, D, H = 6, 16, 8


def _experts(name):
    """A decorated experts module of each layout, random weights, "sparsemoe" selected."""
    cls = {"mixtral": MixtralExperts, "gpt_oss": GptOssExperts, "aria": AriaExperts,
           "nemotron_h": NemotronHExperts, "muse_spark": MuseSparkExperts}[name]
    config = coverage.tiny_config(coverage.model_class(name).config_class, name,
                                  hidden_size=D, intermediate_size=H, moe_intermediate_size=H,
                                  num_local_experts=N, num_experts=N, n_routed_experts=N,
                                  moe_num_experts=N, moe_hidden_size=D)
    config._experts_implementation = backend.NAME
    torch.manual_seed(0)
    module = cls(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


LAYOUTS = ["mixtral", "gpt_oss", "aria", "nemotron_h", "muse_spark"]


def _reference(module, x, index, weights):
    """``y_t = Σ_j w_tj · E_{e_tj}(x_t)`` token by token in float64, from the weights."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    w = {n: p.detach().double() for n, p in module.named_parameters()}
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e >= module.num_experts:
                continue
            up_name = "gate_up_proj" if module.has_gate else "up_proj"
            up = w[up_name][e] if module.is_transposed else w[up_name][e].T  # [d, out]
            h = x[t].double() @ up
            if module.has_bias:
                h = h + w[f"{up_name}_bias"][e]
            h = (module._apply_gate(h[None].float()).double()[0] if module.has_gate
                 else module.act_fn(h.float()).double())
            down = w["down_proj"][e] if module.is_transposed else w["down_proj"][e].T
            y = h @ down
            if module.has_bias:
                y = y + w["down_proj_bias"][e]
            if module.has_post_expert_norm:
                y = module.post_expert_norm(y[None].float()).double()[0]
            out[t] += weights[t, j].double() * y
    return out


def _routing(t, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(t)]) if t else (
        torch.zeros(0, k, dtype=torch.long))
    weights = torch.rand(t, k, generator=g)
    return index, weights


def test_registered_on_import():
    assert ALL_EXPERTS_FUNCTIONS["sparsemoe"] is backend.sparsemoe_experts_forward
    sparsemoe.interop.register()  # idempotent
    assert ALL_EXPERTS_FUNCTIONS["sparsemoe"] is backend.sparsemoe_experts_forward


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [0, 1, 13])
def test_every_layout_matches_the_definition(layout, tokens):
    module = _experts(layout)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(tokens)
    y = module(x, index, weights)
    assert y.shape == (tokens, D) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), _reference(module, x, index, weights),
                               atol=2e-5, rtol=1e-5)


def _gradients(module, impl, x, index, weights):
    """Gradients of ``Σ y²`` for the input, the routing weights and every parameter."""
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    module(x, index, weights).square().sum().backward()
    return [x.grad, weights.grad] + [p.grad.clone() for p in module.parameters()]


def _check_gradients_against_eager(module, impl, x, index, weights):
    """``impl``'s float32 gradients against eager's on a float64 copy: the two sum in
    different orders (BLAS blocks, the few-row kernel's vectors), so each is held to the
    float32 floor that eager itself meets, 3e-5."""
    reference = _gradients(copy.deepcopy(module).double(), "eager", x.double(), index,
                           weights.double())
    for got, want in zip(_gradients(module, impl, x, index, weights), reference, strict=True):
        torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_equal_transformers_eager(layout):
    """Both float32 implementations against eager in float64 (not against each other's
    rounding)."""
    module = _experts(layout)
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(3))
    index, weights = _routing(11)

    for impl in ("eager", backend.NAME):
        _check_gradients_against_eager(module, impl, x, index, weights)


def test_gradcheck_float64():
    module = _experts("gpt_oss").double()
    module.limit = 100.0  # keep the clamps of GPT-OSS's gate away from the inputs' range
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    index, weights = _routing(5, k=3)
    weights = weights.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: module(x, index, w), (x, weights))


def test_expert_parallel_sentinel_is_skipped():
    module = _experts("mixtral")
    module._is_expert_parallel = True
    x = torch.randn(7, D)
    index, weights = _routing(7)
    index[::2, 1] = N  # the sentinel of an expert held by another rank
    torch.testing.assert_close(module(x, index, weights).double(),
                               _reference(module, x, index, weights), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss"])
def test_bfloat16_autocast_and_bfloat16_weights(layout):
    module = _experts(layout)
    x = torch.randn(9, D)
    index, weights = _routing(9)
    ref = _reference(module, x, index, weights).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, index, weights)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
    module.to(torch.bfloat16)
    y16 = module(x.bfloat16(), index, weights.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


def test_discovery_finds_the_known_families():
    found = coverage.families()
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"):
        assert family in found
    assert all(names for names in found.values())


# One family per layout and routing style; the full sweep is test_every_family below.
# ergo: its experts wrap the dispatched projections (one row per route, a per-expert norm after);
# longcat_flash: identity experts routed beside the real ones, sent to them with weight 0.
REPRESENTATIVE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3",
                  "nemotron_h", "muse_spark", "aria", "phimoe", "ergo", "longcat_flash"]


@pytest.mark.parametrize("family", REPRESENTATIVE)
def test_whole_model_logits_and_gradients_match_eager(family):
    result = coverage.check_family(family, grad=True)
    assert result.error is None, result.error
    # float32 logits of O(1), summed in another order than eager's: 2e-5 (1e-5 measured on
    # all but one family, 1.01e-5 on muse_spark with the few-row kernel)
    assert result.max_err <= 2e-5 and result.grad_err <= 1e-5, result
    assert result.scale > 1e-3, result  # the experts do change the output


@pytest.mark.slow
def test_every_family():
    results = [coverage.check_family(f) for f in coverage.families()]
    failed = [r for r in results if not r.passed()]
    assert not failed, coverage.table(failed)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_greedy_generation_is_identical(family):
    model = coverage.tiny_model(family)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    out = {}
    for impl in ("eager", backend.NAME):
        model.set_experts_implementation(impl)
        out[impl] = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                   pad_token_id=0)
    assert out["eager"].shape == (2, 5 + 32)
    assert torch.equal(out[backend.NAME], out["eager"])


def test_readme_backend_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    exec(compile(code, "README backend example", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 3, 1000])"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_sized_batches_match_the_definition_and_eager(layout, tokens, monkeypatch,
                                                             grouped_matmul_impls):
    """``T·k ≤ n``: weights stored ``[n, in, out]`` (``is_transposed``) take the decode path
    (one BLAS product per expert hit; DECODE_MIN_COLUMNS lowered so these narrow weights stand
    for wide ones), views of ``[n, out, in]`` keep the kernel; both equal the float64
    definition, and their gradients eager's in float64."""
    from sparsemoe import dispatch

    monkeypatch.setattr(dispatch, "DECODE_MIN_COLUMNS", 1)
    seen = grouped_matmul_impls
    module = _experts(layout)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(4))
    index, weights = _routing(tokens)
    torch.testing.assert_close(module(x, index, weights).double(),
                               _reference(module, x, index, weights), atol=2e-5, rtol=1e-5)
    assert set(seen) == {"loop"} if module.is_transposed else "loop" not in seen
    _check_gradients_against_eager(module, backend.NAME, x, index, weights)
