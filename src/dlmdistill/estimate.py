"""Memory of a training step before running it (``dlmdistill estimate``).

Everything here is arithmetic on the model's configuration: no weights are loaded and no tensor is
allocated. A model is reduced to an ``Arch`` (the shapes of a Llama-style decoder: Llama, the
built-in presets, LLaDA, Dream/Qwen2, Mistral, ...), a run to a ``Workload`` (method, batch,
sequence length, LoRA, precision, gradient checkpointing), and ``estimate`` returns the memory per
device of the four parts of a training step under DDP, ZeRO-2, ZeRO-3 and FSDP (full shard):

* **weights**: trainable parameters, plus frozen ones (the LoRA base, KD's teacher, the frozen
  initial policy of d-OPSD / diffu-GRPO under full fine-tuning);
* **gradients** of the trainable parameters;
* **optimizer state**: AdamW's two moments, and the fp32 master copy under mixed precision;
* **activations**: what autograd keeps for the backward pass, plus the LM head's [rows, vocab]
  buffers (the head runs only at the positions a loss needs).

Bytes per trainable parameter (weights + gradients + optimizer), as in the ZeRO paper's accounting
(Rajbhandari et al., 2020, K = 12 for mixed-precision Adam):

    fp32: 4 + 4 + 8          bf16 (mixed precision): 2 + 2 + 12 (fp32 master, m and v)

Under Accelerate's ``mixed_precision: bf16`` with fp32 weights the split is 4 + 4 + 8 instead
(autocast keeps the weights in fp32): the same 16 bytes per trainable parameter. Frozen weights
take 4 (fp32) or 2 (bf16) bytes.

Sharding (N devices). DDP replicates everything and, with N > 1, holds gradient buckets the size
of the gradients. ZeRO-2 shards gradients and optimizer state. ZeRO-3 and FSDP shard weights too,
and gather the unsharded weights of the embeddings, the head and two decoder layers (the one
computing and the one prefetched) in the compute dtype. Frozen teachers and frozen policy copies
are loaded next to the wrapped model on every device (dlmdistill does not wrap them), so they are
never sharded.

Activations per token of one decoder layer, in elements (hidden h, FFN f, query width q, key/value
width kv, heads n, LoRA rank r), counted from what autograd saves in transformers' Llama layer
with SDPA attention (the attention saves q, k, v, its output and a per-head log-sum-exp: no
L x L matrix):

    full fine-tuning:  6h + 2q + 2kv + 4f + n + 2
    LoRA (frozen base): 2h + 2q + 2kv + 3f + n + 2 + sum over adapted linears (2 d_in + r)
                        (a linear with frozen weight saves nothing; LoRA's dropout saves its mask
                        and its output, both of the linear's input width d_in; lora_dropout = 0:
                        d_in once, shared by the adapters reading the same input, + r)

With gradient checkpointing every layer keeps only its input (h per token) and one layer at a time
is recomputed with its full activations during the backward pass. Norm statistics and the
attention's log-sum-exp are fp32; everything else is in the compute dtype.

Method multipliers (``Workload``):

* ``sft``: one forward with gradient over B x L; the head at the masked positions
  (``mask_fraction`` of the tokens);
* ``selffusion``: the two copies (easy and hard mode) are 2B sequences in one forward; the head at
  the masked positions of both; the calibration RMSNorm (h parameters) is trained too;
* ``kd``: the student as SFT, plus the frozen teacher's weights and its forward without gradient
  (its logits at the student's masked positions are kept for the loss);
* ``dopsd``: rollouts without gradient (``rollout_batch`` sequences), then micro-batches of B step
  states with gradient, the head only at K_t (``gen_length / diffusion_steps`` positions per
  state), the teacher's forward without gradient on the same states; the fixed teacher is the
  frozen initial policy: a full copy of the weights under full fine-tuning, the adapters disabled
  under LoRA;
* ``diffu-grpo``: group completions rolled out without gradient, micro-batches of B completions with
  gradient and the head over every completion position; with beta > 0 the reference policy (a frozen
  copy under full fine-tuning, the adapters disabled under LoRA) runs without gradient.

Not counted: the CUDA context and kernels' workspaces (~0.5-1 GB per GPU), the caching allocator's
fragmentation (on a CPU, glibc's heap keeps freed activations resident unless
``MALLOC_MMAP_THRESHOLD_`` is set: see docs/benchmarks.md), communication buffers other than DDP's buckets, a rollout's recorded trajectory
(S x B x G integers), Python and library overheads (on a CPU, the process's resident memory after
imports). These are what ``benchmarks/bench_large.py`` measures around the estimate.

Why one file of this length: one estimator per method over the same ``Arch`` / ``Workload`` arithmetic;
splitting it would spread one formula across modules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Dtype = Literal["fp32", "bf16"]
Engine = Literal["ddp", "zero2", "zero3", "fsdp"]
METHODS = ("sft", "selffusion", "kd", "dopsd", "diffu-grpo")
ENGINES: tuple[Engine, ...] = ("ddp", "zero2", "zero3", "fsdp")
ENGINE_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP (full shard)"}
#: the project's default LoRA targets (ModelConfig.lora_target_modules)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: SMDM's vocabulary (TinyLlama's 32,000 tokens) plus the mask token: the default for presets
PRESET_VOCAB = 32001
#: name (lower case) -> shipped config shapes under dlmdistill/resources/
KNOWN_MODELS = {
    "llada-8b": "llada-8b.json", "gsai-ml/llada-8b-base": "llada-8b.json",
    "gsai-ml/llada-8b-instruct": "llada-8b.json",
    "dream-7b": "dream-7b.json", "dream-org/dream-v0-base-7b": "dream-7b.json",
    "dream-org/dream-v0-instruct-7b": "dream-7b.json",
}
#: bytes per trainable parameter: weights, gradients, optimizer state
TRAINABLE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}
#: bytes per element of frozen weights and of activations
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
#: bytes per weight of a linear layer loaded in 4-bit NF4 (``model.load_in_4bit``): the 4-bit code plus one
#: fp32 absmax per block of 64 weights (bitsandbytes' default); embeddings, norms and the LM head are upcast to
#: fp32 (peft's ``prepare_model_for_kbit_training``)
NF4_BYTES = 0.5 + 4 / 64
#: [rows, vocab] fp32 buffers of the LM head alive at the peak of a step with gradient: the logits,
#: the log-softmax kept for backward and their gradients (3); the distillation losses also hold the
#: teacher's distribution and the divergence's terms
HEAD_BUFFERS = {"sft": 3, "selffusion": 6, "kd": 5, "dopsd": 6, "diffu-grpo": 4}


class EstimateError(ValueError):
    """A model that cannot be resolved or a workload that makes no sense; the message says which."""


# ============================================================================== model shapes
@dataclass(frozen=True)
class Arch:
    """The shapes of a Llama-style decoder that its memory depends on.

    vocab_size: rows of the embedding table (and of the head unless ``tie_embeddings``).
    hidden_size h, intermediate_size f (SwiGLU: gate, up [h -> f], down [f -> h]),
    num_heads x head_dim = q (query width), num_kv_heads x head_dim = kv (key/value width).
    qkv_bias: bias vectors on q/k/v (Qwen2/Dream); o_bias: on o_proj too (Llama attention_bias).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers: name -> (in_features, out_features)."""
        h, f = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def layer_params(self) -> int:
        """One decoder layer: its linear weights, biases and two RMSNorm scales."""
        weights = sum(i * o for i, o in self.linears().values())
        bias = (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0)
        return weights + bias + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's own weight (0 when tied to the embeddings)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """All parameters: embeddings + layers + final norm + head."""
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + self.head_params

    def lora_params(self, r: int, targets: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> int:
        """LoRA adapters of rank ``r`` on ``targets`` in every layer: r x (d_in + d_out) each."""
        lin = self.linears()
        return self.num_layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)


def arch_from_config(config: dict[str, Any], name: str = "", source: str = "") -> Arch:
    """An ``Arch`` from a config mapping: transformers keys (Llama, Qwen2/Dream, Mistral, ...) or
    LLaDA's own keys (``d_model``, ``n_layers``, ``mlp_hidden_size``, ...)."""
    c = {k: v for k, v in config.items() if v is not None}
    model_type = str(c.get("model_type", "")).lower()
    try:
        if "d_model" in c:  # LLaDA / OLMo style
            h, n = int(c["d_model"]), int(c["n_heads"])
            f = int(c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * h)
            return Arch(name=name, vocab_size=int(c.get("embedding_size") or c["vocab_size"]), hidden_size=h,
                        intermediate_size=f, num_layers=int(c["n_layers"]), num_heads=n,
                        num_kv_heads=int(c.get("n_kv_heads") or n), head_dim=h // n,
                        tie_embeddings=bool(c.get("weight_tying", False)),
                        qkv_bias=bool(c.get("include_bias") or c.get("include_qkv_bias")),
                        o_bias=bool(c.get("include_bias")), source=source)
        h, n = int(c["hidden_size"]), int(c["num_attention_heads"])
        qwen = model_type in ("qwen2", "dream")
        return Arch(name=name, vocab_size=int(c["vocab_size"]), hidden_size=h,
                    intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                    num_heads=n, num_kv_heads=int(c.get("num_key_value_heads") or n),
                    head_dim=int(c.get("head_dim") or h // n), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                    qkv_bias=qwen or bool(c.get("attention_bias", False)),
                    o_bias=not qwen and bool(c.get("attention_bias", False)), source=source)
    except KeyError as e:
        raise EstimateError(f"{source or name}: the config has no {e.args[0]!r} field (a Llama-style decoder "
                            f"config is needed: hidden_size, intermediate_size, num_hidden_layers, "
                            f"num_attention_heads, vocab_size)") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EstimateError(f"{path}: invalid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise EstimateError(f"{path}: a config must be a JSON object")
    return data


def resolve_model(spec: str, vocab_size: int | None = None) -> Arch:
    """The ``Arch`` of ``spec``: ``preset:NAME`` (or a bare preset name), a shipped shape
    (``llada-8b``, ``dream-7b`` or their hub ids), a folder with ``config.json``, or a config JSON file.

    vocab_size: the vocabulary of a preset (default ``PRESET_VOCAB``, SMDM's 32,000 + mask); for other
    models it overrides the config's.
    """
    from .models.presets import PRESETS

    key = spec[len("preset:"):] if spec.startswith("preset:") else spec
    if key in PRESETS:
        arch = dict(PRESETS[key])
        arch.setdefault("num_key_value_heads", arch["num_attention_heads"])
        return arch_from_config(dict(arch, vocab_size=vocab_size or PRESET_VOCAB), name=f"preset:{key}",
                                source="dlmdistill.models.presets")
    if spec.startswith("preset:"):
        raise EstimateError(f"unknown preset {key!r}; choose one of {', '.join(PRESETS)}")
    known = KNOWN_MODELS.get(spec.lower())
    if known is not None:
        data = json.loads(resources.files("dlmdistill").joinpath("resources", known).read_text())
        arch = arch_from_config(data, name=spec, source=f"dlmdistill/resources/{known}: {data.get('_source', '')}")
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
            if not path.exists():
                raise EstimateError(f"{spec}: the folder has no config.json")
        if path.is_file():
            arch = arch_from_config(_read_json(path), name=spec, source=str(path))
        else:
            raise EstimateError(f"{spec}: not a preset ({', '.join(PRESETS)}), a known model "
                                f"({', '.join(sorted(KNOWN_MODELS))}), a folder with config.json or a config "
                                f"JSON file (hub ids other than the known ones need their config.json locally)")
    return replace(arch, vocab_size=vocab_size) if vocab_size else arch


def meta_parameter_count(arch: Arch) -> int:
    """Parameters of the transformers model of ``arch`` built on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                  num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                  num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                  tie_word_embeddings=arch.tie_embeddings)
    with torch.device("meta"):
        if arch.qkv_bias and not arch.o_bias:
            model = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            model = LlamaForCausalLM(LlamaConfig(attention_bias=arch.o_bias, **common))
    return sum(p.numel() for p in model.parameters())


# ============================================================================== the workload
@dataclass(frozen=True)
class Workload:
    """One training step per device.

    batch: sequences per forward with gradient (SFT/SelfFusion/KD: the per-device batch; d-OPSD: step
        states per micro-batch; diffu-GRPO: completions per micro-batch).
    seq_len: tokens per sequence (prompt + response).
    lora_r: 0 = full fine-tuning. lora_dropout: whether LoRA's dropout is on (the default 0.05 is).
    mask_fraction: masked share of a sequence's tokens, where the offline methods apply the head
        (t ~ U(0, 1) masks half the response on average; 1.0 bounds the worst step).
    gen_length: on-policy methods' generated tokens (default seq_len // 2); block_length: the
        sampler's block (the head runs at the masked positions of the current block); rollout_batch:
        sequences sampled together (default batch); diffusion_steps: d-OPSD's rollout steps (default
        gen_length // 2), so each state trains gen_length / diffusion_steps positions (K_t).
    teacher: KD's teacher (default: the student's shape). beta: diffu-GRPO's KL weight (> 0: a reference).
    load_in_4bit: the frozen base's decoder linears in 4-bit NF4 (LoRA only; ``NF4_BYTES`` per weight).
    """

    method: str = "sft"
    batch: int = 1
    seq_len: int = 512
    dtype: Dtype = "bf16"
    lora_r: int = 0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_dropout: bool = True
    gradient_checkpointing: bool = False
    mask_fraction: float = 0.5
    gen_length: int | None = None
    block_length: int = 32
    rollout_batch: int | None = None
    diffusion_steps: int | None = None
    teacher: Arch | None = None
    beta: float = 0.04
    load_in_4bit: bool = False

    def validate(self, arch: Arch) -> None:
        if self.method not in METHODS:
            raise EstimateError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dtype not in DTYPE_BYTES:
            raise EstimateError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.batch < 1 or self.seq_len < 1 or self.lora_r < 0:
            raise EstimateError("batch and seq_len must be >= 1 and lora_r >= 0")
        if self.load_in_4bit and not self.lora_r:
            raise EstimateError("load_in_4bit: 4-bit weights are frozen; give a LoRA rank (--lora_r)")
        if not 0 < self.mask_fraction <= 1:
            raise EstimateError("mask_fraction must be in (0, 1]")
        bad = [t for t in self.lora_targets if t not in arch.linears()]
        if bad:
            raise EstimateError(f"unknown LoRA target(s) {bad}; choose among {', '.join(arch.linears())}")
        if self.gen_length is not None and not 0 < self.gen_length <= self.seq_len:
            raise EstimateError("gen_length must be in [1, seq_len]")
        if self.block_length < 1:
            raise EstimateError(f"block_length must be >= 1, got {self.block_length}")
        for name in ("rollout_batch", "diffusion_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EstimateError(f"{name} must be >= 1 (or left out for its default), got {getattr(self, name)}")

    @property
    def gen(self) -> int:
        return self.gen_length or max(1, self.seq_len // 2)

    @property
    def steps(self) -> int:
        return self.diffusion_steps or max(1, self.gen // 2)


# ============================================================================== activations
def layer_activation_elements(arch: Arch, lora_r: int = 0, lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
                              lora_dropout: bool = True) -> tuple[int, int]:
    """Elements autograd keeps per token for one decoder layer: ``(compute dtype, fp32)``.

    Full fine-tuning: ``6h + 2q + 2kv + 4f`` in the compute dtype (each RMSNorm: its input, the
    normalised input, its output; q, k, v after RoPE and the attention output; the FFN's gate, its
    SiLU, up and their product) and ``n + 2`` in fp32 (the attention's log-sum-exp per head, one
    rsqrt per norm). LoRA: ``2h + 2q + 2kv + 3f`` (frozen linears and norm scales save no inputs)
    plus, per adapted linear, its dropout's mask and output (``2 d_in``) and the rank-r
    intermediate; without dropout, each distinct input once, plus r per adapter.
    """
    h, f, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    fp32 = arch.num_heads + 2
    if lora_r == 0:
        return 6 * h + 2 * q + 2 * kv + 4 * f, fp32
    lin = arch.linears()
    compute = 2 * h + 2 * q + 2 * kv + 3 * f
    if lora_dropout:
        compute += sum(2 * lin[t][0] + lora_r for t in lora_targets)
    else:
        # inputs: the first norm's output (q/k/v), the attention output (o, already counted), the second
        # norm's output (gate/up), the FFN product (down)
        groups = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "o_proj": "attn", "gate_proj": "n2",
                  "up_proj": "n2", "down_proj": "prod"}
        width = {"n1": h, "attn": 0, "n2": h, "prod": f}
        compute += sum(width[g] for g in {groups[t] for t in lora_targets}) + lora_r * len(lora_targets)
    return compute, fp32


def forward_activation_bytes(arch: Arch, batch: int, seq_len: int, *, dtype: Dtype, lora_r: int = 0,
                             lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, lora_dropout: bool = True,
                             gradient_checkpointing: bool = False) -> int:
    """Bytes autograd keeps for one forward with gradient over ``batch x seq_len`` tokens, at the peak
    of its backward pass (the LM head excluded; see ``head_bytes``).

    no checkpointing:   layers x per_layer x T
    checkpointing:      layers x h x T (each layer's input)  +  per_layer x T (the layer being recomputed)
    both:               + 3h x T (final norm) + B x L x L bytes (the boolean padding mask of the attention)
    """
    tokens = batch * seq_len
    a = DTYPE_BYTES[dtype]
    compute, fp32 = layer_activation_elements(arch, lora_r, lora_targets, lora_dropout)
    per_layer = (compute * a + fp32 * 4) * tokens
    h = arch.hidden_size
    layers = arch.num_layers * h * a * tokens + per_layer if gradient_checkpointing else arch.num_layers * per_layer
    return layers + 3 * h * a * tokens + batch * seq_len * seq_len


def inference_activation_bytes(arch: Arch, batch: int, seq_len: int, *, dtype: Dtype) -> int:
    """Peak transient bytes of a forward without gradient: one layer's largest temporaries (the FFN's
    gate, SiLU and up, the residual stream and a norm, ``3f + 4h`` per token) and the padding mask."""
    return (3 * arch.intermediate_size + 4 * arch.hidden_size) * DTYPE_BYTES[dtype] * batch * seq_len \
        + batch * seq_len * seq_len


def head_bytes(arch: Arch, rows: float, buffers: int, *, dtype: Dtype) -> int:
    """LM-head memory: ``buffers`` fp32 [rows, V] tensors plus the gathered hidden states [rows, h]."""
    return int(rows * (buffers * arch.vocab_size * 4 + arch.hidden_size * DTYPE_BYTES[dtype]))


# ============================================================================== the estimate
@dataclass
class Estimate:
    """The estimate of one workload: parameter counts, per-engine memory per device (bytes)."""

    arch: Arch
    workload: Workload
    params: int
    trainable: int
    frozen_sharded: int  # frozen parameters inside the wrapped model (the LoRA base)
    frozen_replicated: int  # frozen parameters outside it (teacher, frozen policy copy)
    activations: int
    activation_parts: dict[str, int]
    engines: dict[str, dict[str, int]] = field(default_factory=dict)
    gpus: int = 1
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = asdict(self.arch) | {"params": self.arch.params}
        d["workload"] = {k: v for k, v in asdict(self.workload).items() if k != "teacher"}
        d["workload"]["teacher"] = self.workload.teacher.name if self.workload.teacher else None
        return d


def static_parameters(arch: Arch, w: Workload) -> tuple[int, int, int, list[str]]:
    """``(trainable, frozen inside the wrapped model, frozen outside it, notes)`` for workload ``w``."""
    notes = []
    if w.lora_r:
        trainable, frozen_in = arch.lora_params(w.lora_r, w.lora_targets), arch.params
    else:
        trainable, frozen_in = arch.params, 0
    frozen_out = 0
    if w.method == "selffusion":
        trainable += arch.hidden_size
        notes.append("SelfFusion: the calibration RMSNorm (h parameters) is trained with the model")
    if w.method == "kd":
        teacher = w.teacher or arch
        frozen_out = teacher.params
        notes.append(f"KD: frozen teacher {teacher.name} ({teacher.params / 1e9:.3g}B parameters) on every device")
    if (w.method == "dopsd" or (w.method == "diffu-grpo" and w.beta > 0)):
        who = "d-OPSD's fixed teacher" if w.method == "dopsd" else "diffu-GRPO's reference policy (beta > 0)"
        if w.lora_r:
            notes.append(f"{who}: the LoRA base with adapters disabled (no extra weights)")
        else:
            frozen_out = arch.params
            notes.append(f"{who}: a frozen copy of the initial weights on every device")
    return trainable, frozen_in, frozen_out, notes


def activation_parts(arch: Arch, w: Workload) -> dict[str, int]:
    """The activation memory of ``w``'s phases; the step's peak is their maximum (``activations``)."""
    kw = dict(dtype=w.dtype, lora_r=w.lora_r, lora_targets=w.lora_targets, lora_dropout=w.lora_dropout,
              gradient_checkpointing=w.gradient_checkpointing)
    b, length, v = w.batch, w.seq_len, HEAD_BUFFERS[w.method]
    if w.method in ("sft", "kd"):
        rows = w.mask_fraction * b * length
        train = forward_activation_bytes(arch, b, length, **kw) + head_bytes(arch, rows, v, dtype=w.dtype)
        parts = {"training forward+backward": train}
        if w.method == "kd":
            teacher = w.teacher or arch
            parts["teacher forward (no grad)"] = inference_activation_bytes(teacher, b, length, dtype=w.dtype) \
                + head_bytes(teacher, rows, 2, dtype=w.dtype)
        return parts
    if w.method == "selffusion":
        rows = w.mask_fraction * 2 * b * length
        return {"training forward+backward (2B copies)": forward_activation_bytes(arch, 2 * b, length, **kw)
                + head_bytes(arch, rows, v, dtype=w.dtype)}
    # on-policy: rollouts, then micro-batches with gradient (plus a no-grad teacher/reference forward)
    rb = w.rollout_batch or b
    # the sampler's head, softmax and (float64) noise at the current block's masked positions
    rollout = inference_activation_bytes(arch, rb, length, dtype=w.dtype) \
        + head_bytes(arch, rb * min(w.block_length, w.gen), 4, dtype=w.dtype)
    rows = b * (w.gen / w.steps if w.method == "dopsd" else w.gen)
    train = forward_activation_bytes(arch, b, length, **kw) + head_bytes(arch, rows, v, dtype=w.dtype)
    return {"rollouts (no grad)": rollout, "training micro-batch": train,
            "teacher/reference forward (no grad)": inference_activation_bytes(arch, b, length, dtype=w.dtype)
            + head_bytes(arch, rows, 2, dtype=w.dtype)}


def estimate(arch: Arch, w: Workload, *, gpus: int = 1) -> Estimate:
    """Memory per device of workload ``w`` on model ``arch`` under every engine with ``gpus`` devices.

    Per engine: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total`` (bytes).
    """
    w.validate(arch)
    if gpus < 1:
        raise EstimateError("gpus must be >= 1")
    trainable, frozen_in, frozen_out, notes = static_parameters(arch, w)
    wb, gb, ob = TRAINABLE_BYTES[w.dtype]
    fb = DTYPE_BYTES[w.dtype]
    parts = activation_parts(arch, w)
    # the teacher's no-grad forward and the rollouts happen before the trained forward: peaks do not add
    acts = max(parts.values())
    frozen_in_bytes = frozen_in * fb
    if w.load_in_4bit:  # the decoder layers' linears in NF4, the rest of the base in the dtype
        quantized = arch.num_layers * sum(i * o for i, o in arch.linears().values())
        frozen_in_bytes = quantized * NF4_BYTES + (frozen_in - quantized) * DTYPE_BYTES["fp32"]
        notes.append(f"4-bit NF4 base: {quantized / 1e9:.3g}B decoder-linear weights at {NF4_BYTES} bytes each "
                     f"(code + absmax per 64); the embeddings, norms and LM head in fp32 (peft's "
                     f"prepare_model_for_kbit_training upcasts them)")
    gathered = (arch.embedding_params + arch.head_params + arch.hidden_size + 2 * arch.layer_params) * fb
    engines: dict[str, dict[str, int]] = {}
    for e in ENGINES:
        shard_w = e in ("zero3", "fsdp")
        shard_go = e != "ddp"
        weights = (trainable * wb + frozen_in_bytes) / (gpus if shard_w else 1) + frozen_out * fb
        if shard_w and gpus > 1:
            weights += gathered
        grads = trainable * gb / (gpus if shard_go else 1)
        if e == "ddp" and gpus > 1:
            grads *= 2  # DDP's gradient buckets
        opt = trainable * ob / (gpus if shard_go else 1)
        row = {"weights": int(weights), "gradients": int(grads), "optimizer": int(opt), "activations": int(acts)}
        row["total"] = sum(row.values())
        engines[e] = row
    if w.dtype == "bf16":
        notes.append("bf16: mixed precision, 2 + 2 + 12 bytes per trainable parameter (bf16 weights and "
                     "gradients, fp32 master and AdamW moments); frozen weights in bf16 (model.dtype / "
                     "teacher_dtype bfloat16; fp32 frozen weights under autocast take twice as much)")
    return Estimate(arch=arch, workload=w, params=arch.params, trainable=trainable, frozen_sharded=frozen_in,
                    frozen_replicated=frozen_out, activations=acts, activation_parts=parts, engines=engines,
                    gpus=gpus, notes=notes)


# ============================================================================== output
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_estimate(est: Estimate, gpu_memory_gib: float | None = None) -> str:
    """A plain-text report: the model, the workload, the activation phases and one row per engine."""
    a, w = est.arch, est.workload
    lines = [f"model       {a.name}: {est.params:,} parameters ({est.params / 1e9:.3g}B; layers {a.num_layers}, "
             f"hidden {a.hidden_size}, FFN {a.intermediate_size}, heads {a.num_heads}/{a.num_kv_heads} kv, "
             f"vocab {a.vocab_size})",
             f"            shapes from {a.source}" if a.source else None,
             f"method      {w.method}, {'LoRA r=' + str(w.lora_r) if w.lora_r else 'full fine-tuning'}: "
             f"{est.trainable:,} trainable parameters; {w.dtype}; batch {w.batch} x {w.seq_len} tokens"
             f"{', gradient checkpointing' if w.gradient_checkpointing else ''}"
             + (f"; generation {w.gen} tokens" + (f" in {w.steps} steps" if w.method == 'dopsd' else '')
                if w.method in ('dopsd', 'diffu-grpo') else ""),
             ""]
    lines = [x for x in lines if x is not None]
    lines.append("activations (GiB per device; the peak is the largest phase)")
    for name, v in est.activation_parts.items():
        lines.append(f"  {name:40s} {_gib(v):>8s}")
    lines.append("")
    head = f"{'engine (' + str(est.gpus) + ' device' + ('s' if est.gpus > 1 else '') + ')':22s} {'weights':>8s} " \
           f"{'grads':>8s} {'optim':>8s} {'activ':>8s} {'total':>8s}  GiB per device"
    lines.append(head)
    for e, row in est.engines.items():
        fit = ""
        if gpu_memory_gib:
            fit = "  fits" if row["total"] <= gpu_memory_gib * 2**30 else "  does not fit"
        lines.append(f"{ENGINE_NAMES[e]:22s} " + " ".join(f"{_gib(row[k]):>8s}" for k in
                                                          ("weights", "gradients", "optimizer", "activations",
                                                           "total")) + fit)
    if gpu_memory_gib:
        lines.append(f"(fits: total <= {gpu_memory_gib:g} GiB; leave ~1 GiB for the CUDA context and workspaces)")
    if est.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in est.notes)
    return "\n".join(lines)

