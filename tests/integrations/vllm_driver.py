"""Runs inside the vLLM virtual environment (see scripts/vllm_env.sh), driven by
test_vllm_e2e.py through subprocesses. Prints one JSON object on its last stdout line.

  python vllm_driver.py plugins            # load_general_plugins twice; plugin state
  python vllm_driver.py make-model DIR     # tiny random Qwen2-MoE checkpoint in DIR
  python vllm_driver.py generate DIR       # greedy LLM.generate from fixed token ids

Kept free of pytest and of kernmux imports at module level: it must behave exactly like
a user's process, where vLLM discovers kernmux through its entry point.
"""

from __future__ import annotations

import json
import os
import sys

# Prompt token ids (vocabulary of the tiny model: 512) and generation length.
PROMPTS = [[1, 17, 42, 99, 7, 300], [5, 5, 81, 250, 13], [400, 3, 77, 128, 64, 9, 2, 11]]
MAX_TOKENS = 8


def plugins() -> dict:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    load_general_plugins()
    import kernmux.integrations.vllm as plugin

    return {"pid": os.getpid(), "state": plugin.state()}


def make_model(path: str) -> dict:
    """A 2-layer Qwen2-MoE with random weights (8 experts, top-2, one gated shared expert)."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        # Wider than the default 0.02 so router logits and next-token logits are far
        # from ties: the comparison is about routing, not about rounding of near-ties.
        initializer_range=0.2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = Qwen2MoeForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return {"path": path, "params": sum(p.numel() for p in model.parameters())}


def generate(path: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=path,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=64,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False, logprobs=1)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    # The log-probability of each generated token (greedy: the largest of its step).
    logprobs = [
        [float(step[token].logprob) for token, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        for o in outputs
    ]
    del llm
    return {"pid": os.getpid(), "tokens": tokens, "logprobs": logprobs}


def main(argv: list[str]) -> int:
    command = argv[1]
    if command == "plugins":
        result = plugins()
    elif command == "make-model":
        result = make_model(argv[2])
    elif command == "generate":
        result = generate(argv[2])
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.stdout.flush()
    print("\n" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
