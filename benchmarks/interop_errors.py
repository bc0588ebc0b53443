"""Measured output error of sparsemoe layers converted from ``transformers`` MoE blocks.

For each supported block: random weights (normal, std ``--std``), float32, evaluation mode,
``--seeds`` draws of a ``[4, 64, d_model]`` input; prints the largest |sparsemoe − transformers|
over all outputs and seeds, and the largest |output|. No download: configs are built here.

    python benchmarks/interop_errors.py            # d_model 64, 8 experts, top-2
    python benchmarks/interop_errors.py --std 0.02 --seeds 50
"""

from __future__ import annotations

import argparse

import torch
import transformers
from transformers import (
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    SwitchTransformersConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from sparsemoe.interop import from_transformers

D, H, N = 64, 128, 8
BLOCKS = {
    "MixtralSparseMoeBlock": lambda: MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=D, intermediate_size=H, num_local_experts=N, num_experts_per_tok=2)),
    "OlmoeSparseMoeBlock": lambda: OlmoeSparseMoeBlock(OlmoeConfig(
        hidden_size=D, intermediate_size=H, num_experts=N, num_experts_per_tok=2)),
    "Qwen2MoeSparseMoeBlock": lambda: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=H, shared_expert_intermediate_size=2 * H,
        num_experts=N, num_experts_per_tok=2)),
    "Qwen3MoeSparseMoeBlock": lambda: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=H, num_experts=N, num_experts_per_tok=2,
        norm_topk_prob=True)),
    "SwitchTransformersSparseMLP": lambda: SwitchTransformersSparseMLP(SwitchTransformersConfig(
        d_model=D, d_ff=H, num_experts=N, expert_capacity=10)),
    "DeepseekV3MoE": lambda: DeepseekV3MoE(DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=H, n_routed_experts=N, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--std", type=float, default=0.1, help="weight init std")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, float32, "
          f"d_model {D}, expert hidden {H}, {N} experts, std {args.std}, {args.seeds} seeds")
    print("| block | max abs error | max abs output |\n|---|---|---|")
    for name, make in BLOCKS.items():
        worst = largest = 0.0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            block = make().eval()
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0.0, args.std)
                for b in block.buffers():  # DeepSeek-V3's e_score_correction_bias
                    b.normal_(0.0, args.std)
            layer = from_transformers(block).eval()
            x = torch.randn(4, 64, D)
            with torch.no_grad():
                ref = block(x.clone())
                out = layer(x)
            worst = max(worst, float((out - ref).abs().max()))
            largest = max(largest, float(ref.abs().max()))
        print(f"| `{name}` | {worst:.1e} | {largest:.2f} |")


if __name__ == "__main__":
    main()
