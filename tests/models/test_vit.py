import pytest
import torch
import torch.nn.functional as F

from sparsemoe.models.vit import VisionMoE, ViTConfig, digits_config, vmoe_layer


def hand_layer(policy: str):
    """Two experts, top-1; logits (x0, 0), so every token below goes to expert 0 with weight
    σ(x0); a capacity ratio of 1 gives each expert ⌈1·4/2·1⌉ = 2 of the 4 tokens."""
    cfg = ViTConfig(d_model=2, n_heads=1, ffn_hidden=3, num_experts=2, k=1,
                    capacity_factor=1.0, policy=policy)
    layer = vmoe_layer(cfg).double().eval()
    with torch.no_grad():
        layer.router.w_gate.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        layer.experts.w1.copy_(torch.arange(12.0, dtype=torch.float64).reshape(2, 2, 3) / 10)
        layer.experts.w2.copy_(torch.arange(12.0, dtype=torch.float64).reshape(2, 3, 2) / 10)
    return layer


X = torch.tensor([[2.0, 0.0], [0.5, 0.0], [3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)


def expert0(x):
    w1 = torch.arange(6.0, dtype=torch.float64).reshape(2, 3) / 10
    w2 = torch.arange(6.0, dtype=torch.float64).reshape(3, 2) / 10
    return F.gelu(x @ w1) @ w2


@pytest.mark.parametrize("policy,kept", [("priority", [0, 2]), ("position", [0, 1])])
def test_batch_prioritized_routing_keeps_the_surest_tokens(policy, kept):
    # gates σ(2) = .88, σ(.5) = .62, σ(3) = .95, σ(1) = .73: BPR keeps tokens 2 and 0,
    # token order keeps 0 and 1
    layer = hand_layer(policy)
    y = layer(X)
    gate = torch.sigmoid(X[:, 0])
    expected = torch.zeros_like(X)
    expected[kept] = gate[kept, None] * expert0(X[kept])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert layer.stats.drop_fraction == 0.5


def test_vision_moe_shapes_capacity_and_training_step():
    torch.manual_seed(0)
    cfg = digits_config(8, d_model=16, n_heads=2, ffn_hidden=32, num_experts=4)
    assert (cfg.patch, cfg.num_patches) == (2, 16)
    model = VisionMoE(cfg)
    assert len(model.moe_layers()) == 2  # blocks 1 and 3
    images = torch.rand(5, 8, 8)
    patches = model.patches(images)
    assert patches.shape == (5, 16, 4)
    torch.testing.assert_close(patches[1, 5], images[1, 2:4, 2:4].reshape(-1))  # row 1, col 1
    logits = model(images)
    assert logits.shape == (5, 10)
    model.set_capacity(0.1, "position")
    assert all(m.capacity.factor == 0.1 and m.capacity.policy == "position"
               for m in model.moe_layers())
    model(images)
    assert model.moe_layers()[0].stats.drop_fraction > 0.5
    with pytest.raises(ValueError, match=r"image_size \(28\) must be a multiple of patch \(5\)"):
        ViTConfig(patch=5)
