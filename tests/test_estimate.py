"""``dlmdistill estimate``: parameter counts against real models, memory components against hand arithmetic,
and the per-layer activation formula against what autograd actually saves."""

import json

import pytest
import torch

from dlmdistill.cli import main
from dlmdistill.estimate import (Arch, EstimateError, Workload, arch_from_config, estimate, layer_activation_elements,
                                 meta_parameter_count, resolve_model)
from dlmdistill.models import ModelConfig, build_model
from dlmdistill.models.loading import count_parameters

# h = 8, f = 16, 2 layers, 2 heads of 4, vocab 10: small enough to do every sum by hand
HAND = Arch(name="hand", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
            num_kv_heads=2, head_dim=4)


# ------------------------------------------------------------------------------------ parameters
def test_hand_arch_parameter_count():
    # per layer: q, k, v, o 8x8 each (256) + gate, up 8x16, down 16x8 (384) + 2 norms (16) = 656
    assert HAND.layer_params == 656
    # embeddings 80 + 2 layers + final norm 8 + head 80
    assert HAND.params == 80 + 2 * 656 + 8 + 80 == 1480
    # LoRA r=2 on all 7 linears: q,k,v,o 2*(8+8) each, gate/up 2*(8+16), down 2*(16+8); x 2 layers
    assert HAND.lora_params(2) == 2 * (4 * 32 + 3 * 48) == 544


@pytest.mark.parametrize("lora_r", [0, 4])
def test_preset_count_equals_the_built_model(tokenizer, lora_r):
    model, tok = build_model(ModelConfig(name_or_path="preset:tiny", lora_r=lora_r), tokenizer=tokenizer)
    arch = resolve_model("preset:tiny", vocab_size=len(tok))
    assert arch.params == count_parameters(model.hf_model) - (arch.lora_params(lora_r) if lora_r else 0)
    if lora_r:
        assert arch.lora_params(lora_r) == count_parameters(model, trainable_only=True)


def test_qwen2_style_bias_and_gqa_equal_transformers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert arch_from_config(cfg).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_local_folder_and_config_file(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=60, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, tie_word_embeddings=tied)
    cfg.save_pretrained(tmp_path)
    expected = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())  # shared weights counted once
    assert resolve_model(str(tmp_path)).params == expected
    assert resolve_model(str(tmp_path / "config.json")).params == expected


def test_llada_and_dream_shapes():
    llada = resolve_model("llada-8b")
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 12288 + 2 x 4096) + 2 x 126464 x 4096 + 4096
    assert llada.params == 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096
    assert resolve_model("GSAI-ML/LLaDA-8B-Instruct").params == llada.params
    dream = resolve_model("Dream-org/Dream-v0-Instruct-7B")
    kv = 4 * 128
    per_layer = 2 * 3584**2 + 2 * 3584 * kv + 3 * 3584 * 18944 + (3584 + 2 * kv) + 2 * 3584
    assert dream.params == 28 * per_layer + 2 * 152064 * 3584 + 3584
    assert round(dream.params / 1e9, 2) == 7.62 and round(llada.params / 1e9, 2) == 8.02
    for arch in (llada, dream):  # the same counts from transformers models built on the meta device
        assert meta_parameter_count(arch) == arch.params


def test_resolve_errors(tmp_path):
    with pytest.raises(EstimateError, match="unknown preset 'nope'"):
        resolve_model("preset:nope")
    with pytest.raises(EstimateError, match="not a preset"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(EstimateError, match="no config.json"):
        resolve_model(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(EstimateError, match="no 'num_attention_heads' field"):
        resolve_model(str(tmp_path))


# ------------------------------------------------------------------------------------ memory by hand
def test_sft_fp32_components_by_hand():
    w = Workload(method="sft", batch=1, seq_len=4, dtype="fp32")
    est = estimate(HAND, w)
    ddp = est.engines["ddp"]
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (1480 * 4, 1480 * 4, 1480 * 8)
    # per layer per token: 6h + 2q + 2kv + 4f = 48 + 16 + 16 + 64 = 144 fp32 elements, + n + 2 = 4 fp32
    # 2 layers x 4 tokens x (144 + 4) x 4 bytes = 4736; final norm 3h x 4 tokens x 4 = 384; mask 1 x 4 x 4 = 16;
    # head at 0.5 x 4 = 2 rows x (3 buffers x 10 x 4 + 8 x 4) = 304
    assert est.activations == 4736 + 384 + 16 + 304 == 5440
    assert ddp["total"] == 5920 + 5920 + 11840 + 5440


def test_checkpointing_and_lora_by_hand():
    w = Workload(method="sft", batch=1, seq_len=4, dtype="fp32", lora_r=2, gradient_checkpointing=True)
    est = estimate(HAND, w)
    # LoRA layer: 2h + 2q + 2kv + 3f = 16 + 16 + 16 + 48 = 96, + 7 adapters: q,k,v,o,gate,up (2 x 8 + 2) and
    # down (2 x 16 + 2) = 6 x 18 + 34 = 142 -> 238 elements, + 4 fp32
    assert layer_activation_elements(HAND, 2) == (238, 4)
    # checkpointing: 2 layers x h x 4 tokens x 4 B = 256, one layer recomputed (238 + 4) x 4 x 4 = 3872
    assert est.activations == 256 + 3872 + 384 + 16 + 304
    ddp = est.engines["ddp"]
    assert ddp["weights"] == 1480 * 4 + 544 * 4 and ddp["gradients"] == 544 * 4 and ddp["optimizer"] == 544 * 8


def test_sharding_by_hand():
    w = Workload(method="sft", batch=1, seq_len=4, dtype="bf16")
    e = estimate(HAND, w, gpus=2).engines
    p = 1480
    assert e["ddp"]["weights"] == 2 * p and e["ddp"]["gradients"] == 2 * (2 * p) and e["ddp"]["optimizer"] == 12 * p
    assert e["zero2"]["weights"] == 2 * p and e["zero2"]["gradients"] == p and e["zero2"]["optimizer"] == 6 * p
    # ZeRO-3/FSDP: half the weights + gathered embeddings, head, final norm and two layers in bf16
    gathered = (80 + 80 + 8 + 2 * 656) * 2
    for name in ("zero3", "fsdp"):
        assert e[name]["weights"] == p + gathered and e[name]["gradients"] == p and e[name]["optimizer"] == 6 * p


def test_method_multipliers():
    base = dict(batch=2, seq_len=16, dtype="fp32", gradient_checkpointing=True)
    sft = estimate(HAND, Workload(method="sft", **base))
    sf = estimate(HAND, Workload(method="selffusion", **base))
    two = estimate(HAND, Workload(method="sft", **{**base, "batch": 4}))
    # SelfFusion = SFT on 2B sequences, with twice the head buffers (6 instead of 3) at the same rows
    rows = 0.5 * 4 * 16
    assert sf.activations - two.activations == int(rows * 3 * 10 * 4)
    assert sf.trainable == sft.trainable + 8  # the calibration RMSNorm
    kd = estimate(HAND, Workload(method="kd", **base))
    assert kd.frozen_replicated == HAND.params and kd.engines["fsdp"]["weights"] > sft.engines["fsdp"]["weights"]
    full = estimate(HAND, Workload(method="dopsd", **base))
    lora = estimate(HAND, Workload(method="dopsd", lora_r=2, **base))
    assert full.frozen_replicated == HAND.params and lora.frozen_replicated == 0
    assert estimate(HAND, Workload(method="diffu-grpo", beta=0.0, **base)).frozen_replicated == 0
    # d-OPSD trains gen/steps positions per state; diffu-GRPO every completion position
    d = estimate(HAND, Workload(method="dopsd", gen_length=8, diffusion_steps=4, **base))
    g = estimate(HAND, Workload(method="diffu-grpo", gen_length=8, **base))
    assert g.activation_parts["training micro-batch"] - d.activation_parts["training micro-batch"] == \
        int(2 * 8 * (4 * 10 * 4 + 32)) - int(2 * 2 * (6 * 10 * 4 + 32))


# ------------------------------------------------------------------------------------ against autograd
def _saved_bytes(model, ids) -> int:
    """Bytes of the non-parameter tensors autograd saves in a forward (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("lora_r,dropout", [(0, 0.0), (4, 0.05), (4, 0.0)])
def test_layer_formula_equals_what_autograd_saves(lora_r, dropout):
    """One more decoder layer adds exactly the formula's bytes (a middle layer: its input needs grad)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmdistill.models.loading import apply_lora

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=80, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, is_causal=False, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).model
        if lora_r:
            model = apply_lora(model, ModelConfig(lora_r=lora_r, lora_dropout=dropout))
            model.get_input_embeddings().weight.requires_grad_(True)  # so the first layer's input needs grad too
        model.train()
        return _saved_bytes(model, torch.randint(0, 40, (2, 12)))

    arch = Arch(name="t", vocab_size=40, hidden_size=32, intermediate_size=80, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=8)
    compute, fp32 = layer_activation_elements(arch, lora_r, lora_dropout=dropout > 0)
    assert saved(3) - saved(2) == (compute + fp32) * 4 * 2 * 12


# ------------------------------------------------------------------------------------ command line
def test_cli_table_and_json(capsys):
    assert main(["estimate", "--model", "preset:smdm-472m", "--method", "sft", "--lora_r", "16", "--dtype", "fp32",
                 "--batch", "2", "--seq_len", "256", "--gradient_checkpointing", "--gpus", "2",
                 "--gpu_memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "553,829,120 parameters" in out and "FSDP (full shard)" in out and "does not fit" in out
    assert main(["estimate", "--model", "dream-7b", "--method", "kd", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == resolve_model("dream-7b").params and set(data["engines"]) == {"ddp", "zero2", "zero3",
                                                                                            "fsdp"}
    assert data["frozen_replicated"] == data["params"]


@pytest.mark.parametrize("args,message", [
    (["--model", "preset:nope", "--method", "sft"], "estimate: unknown preset 'nope'"),
    (["--model", "/no/such/folder", "--method", "sft"], "estimate: /no/such/folder: not a preset"),
    (["--model", "tiny", "--method", "sft", "--lora_r", "2", "--lora_targets", "qproj"], "unknown LoRA target"),
    # a value given that reads as false is refused, not replaced by the default (issue 25)
    (["--model", "tiny", "--method", "kd", "--teacher", ""], "--teacher is an empty string"),
    (["--model", "tiny", "--method", "sft", "--vocab_size", "0"], "--vocab_size must be > 0, got 0"),
    (["--model", "tiny", "--method", "sft", "--gpu_memory", "0"], "--gpu_memory must be > 0, got 0"),
    (["--model", "tiny", "--method", "dopsd", "--diffusion_steps", "0"], "diffusion_steps must be >= 1"),
    (["--model", "tiny", "--method", "dopsd", "--rollout_batch", "0"], "rollout_batch must be >= 1"),
    (["--model", "tiny", "--method", "dopsd", "--block_length", "0"], "block_length must be >= 1"),
])
def test_cli_user_errors_are_one_line(capsys, args, message):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("estimate: ") and message in err and "\n" not in err and "Traceback" not in err


def test_four_bit_base_by_hand():
    """model.load_in_4bit: the decoder linears (2 layers x (4 x 64 + 3 x 128) = 1,280 weights) at 0.5 byte plus
    an fp32 absmax per 64 weights, the other 200 frozen parameters (embeddings, norms, head) in fp32, even under
    bf16 (peft upcasts them); the 544 LoRA parameters at bf16's 2 bytes."""
    w = Workload(method="sft", batch=1, seq_len=4, dtype="bf16", lora_r=2, gradient_checkpointing=True,
                 load_in_4bit=True)
    ddp = estimate(HAND, w).engines["ddp"]
    assert ddp["weights"] == int(544 * 2 + 1280 * (0.5 + 4 / 64) + 200 * 4)
    with pytest.raises(EstimateError, match="--lora_r"):
        estimate(HAND, Workload(method="sft", load_in_4bit=True))
