"""The engine's decode step in bf16 for Llama-family weights: one new token for each of B sequences, written
as the few tensor operations a decoder layer needs instead of transformers' module tree; and a prompt's
prefill on the same weights (oneDNN's bf16 matrix products, causal attention).

Why our own: at one token per step the model's matrices are read once per token, so a step costs the weights'
bytes over the memory bandwidth plus a fixed cost per operation. transformers' float32 forward reads twice the
bytes, and its bf16 forward pays oneDNN's matrix-vector path and many small modules (measured on a 2-core
AVX512-BF16 CPU, SmolLM2-135M: bench/RESULTS.md). Here:
- the weights are bf16 copies, q/k/v and gate/up concatenated (one matrix product each);
- with one or two sequences oneDNN is switched off for the step, so torch's own bf16 matrix-vector kernel
  runs (1.8x oneDNN's rate at one row, 1.3x at two); from three rows oneDNN's matrix-matrix kernel is faster,
  and faster again on weights packed once into its own blocked layout (a second bf16 copy, made the first time
  three or more rows come: a whole model's products at 16 rows in about half the time of packing them on
  every call, bench/RESULTS.md); where oneDNN is missing or refuses, the plain product runs;
- the residual stream, norms, rotary embedding, keys, values and attention stay float32 (the engine's cache
  is the model's dtype), so only the matrix products round to bf16;
- one sequence's step runs as one compiled C++ call where it can be built (decode_native.py): the same
  arithmetic without some 40 Python-dispatched operations per layer (0.85x llama.cpp's f16 speed on the same
  weights against 0.61x for the Python step, bench/RESULTS.md).

The maths is transformers' Llama: RMSNorm (x * rsqrt(mean(x^2) + eps) * w), rotary embedding from the model's
own `rotary_emb` (so its scaling, e.g. Llama 3's, is the model's), grouped-query attention over each row's
cached positions, SiLU-gated MLP, the tied or untied head. `unsupported(model)` says why a model is not such
a model (the engine then uses transformers' forward).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["Bf16Decoder", "decoder_for", "unsupported"]

FAMILIES = ("llama", "qwen2", "mistral")  # decoder layers of exactly this shape (no q/k norms)


def _weight(linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A projection's weight and bias as the model runs it now: a plain Linear's; a PEFT layer's base where
    its adapters are merged into it or switched off; otherwise its base with each active adapter's terms
    folded into a copy (PEFT's own merge arithmetic on that copy, LoRA and DoRA alike; the model is left as
    it was). None where an active adapter cannot be folded (a variant other than DoRA)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    if not hasattr(linear, "base_layer"):
        return (linear.weight, linear.bias) if isinstance(linear, torch.nn.Linear) else None
    base = linear.base_layer
    if not isinstance(base, torch.nn.Linear):
        return None
    active = [a for a in linear.active_adapters if a in linear.lora_A]
    if getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False) or not active:
        return base.weight, base.bias
    weight, bias = base.weight.detach().clone(), base.bias
    for adapter in active:
        variant = linear.lora_variant.get(adapter)
        if variant is None:
            weight += linear.get_delta_weight(adapter).to(weight.dtype)
        elif isinstance(variant, DoraLinearVariant):  # PEFT's, or model/fast_dora.py's (same merge)
            weight = variant.merge_safe(linear, adapter, weight)
        else:
            return None
        if linear.lora_bias.get(adapter):
            bias = (0 if bias is None else bias) + linear.lora_B[adapter].bias * linear.scaling[adapter]
    return weight, bias


def _core(model):
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    inner = getattr(model, "base_model", None)
    return inner.model if inner is not None and hasattr(inner, "peft_config") else model


def unsupported(model) -> str | None:
    """Why `Bf16Decoder` cannot run `model` (None: it can)."""
    core = _core(model)
    config = core.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    for layer in core.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ):
            if _weight(proj) is None:
                return "an active adapter of a kind that cannot be folded into the weights"
    return None


def decoder_for(model) -> Bf16Decoder | None:
    """A `Bf16Decoder` of the model as it runs now, or None where `unsupported` says it cannot run it."""
    return Bf16Decoder(model) if unsupported(model) is None else None


class _Projection:
    """One projection's bf16 weight and bias; applied to 3 rows or more through oneDNN's packed copy of the
    weight (module doc), made at that first use."""

    __slots__ = ("weight", "bias", "packed")
    packing = True  # False once oneDNN packing is found missing or failing here: plain products from then on

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias, self.packed = weight, bias, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2 and _Projection.packing and x.device.type == "cpu":
            try:
                if self.packed is None:
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            except (AttributeError, RuntimeError, NotImplementedError):
                _Projection.packing = False  # a build without oneDNN: its plain product below
        return F.linear(x, self.weight, self.bias)


class Bf16Decoder:
    """bf16 copies of a model's weights and the decode step over them (see module doc). The copies are taken
    when it is made, of the model as it runs at that moment: its active adapters folded in, or none where
    they are switched off (`_weight`); a decoder keeps serving those weights (make a new one after a change)."""

    def __init__(self, model):
        core = _core(model)
        config = core.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        self.scale = self.head_dim**-0.5
        self.rotary = core.model.rotary_emb

        def bf16(*tensors):
            present = [t for t in tensors if t is not None]
            if not present:
                return None
            return torch.cat([t.detach() for t in present]).to(torch.bfloat16).contiguous()

        def fused(*linears) -> _Projection:
            pairs = [_weight(lin) for lin in linears]
            biases = [b for _, b in pairs]
            return _Projection(
                bf16(*(w for w, _ in pairs)), bf16(*biases) if all(b is not None for b in biases) else None
            )

        self.layers = []
        for layer in core.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight.detach().float(),
                    layer.input_layernorm.variance_epsilon,
                    fused(attn.q_proj, attn.k_proj, attn.v_proj),
                    fused(attn.o_proj),
                    layer.post_attention_layernorm.weight.detach().float(),
                    layer.post_attention_layernorm.variance_epsilon,
                    fused(mlp.gate_proj, mlp.up_proj),
                    fused(mlp.down_proj),
                )
            )
        self.embed = core.model.embed_tokens.weight.detach()  # rows are gathered, not multiplied: as stored
        self.norm = (core.model.norm.weight.detach().float(), core.model.norm.variance_epsilon)
        self.head = _Projection(bf16(core.lm_head.weight), None)
        self._native = None  # decode_native's compiled one-row step: made at first use, False if unavailable

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).to(torch.bfloat16)

    def _attention_inputs(self, x, norm, eps, qkv_w, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries and keys rotated, (n, heads + kv heads, dim); values, (n, kv heads, dim)) for n rows."""
        heads, kv = self.heads, self.kv_heads
        qkv = qkv_w(self._norm(x, norm, eps)).float().view(x.shape[0], heads + 2 * kv, self.head_dim)
        qk = qkv[:, : heads + kv]
        return torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin), qkv[:, heads + kv :]

    def _mlp(self, x: torch.Tensor, norm: torch.Tensor, eps: float, gate_up_w, down_w) -> None:
        """The SiLU-gated MLP's output added to the residual `x` in place."""
        gate_up = gate_up_w(self._norm(x, norm, eps))
        x.add_(down_w(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]))

    @staticmethod
    @contextlib.contextmanager
    def _onednn(rows: int):
        """oneDNN for the matrix products of 3 rows or more; torch's own kernel for 1 or 2 (module doc)."""
        before = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(rows > 2)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(before)

    @torch.no_grad()
    def prefill(self, prompt: list[int], keys: torch.Tensor, values: torch.Tensor, slot: int) -> torch.Tensor:
        """Float32 logits (vocab,) after `prompt`, its keys and values written into `slot` at 0..len-1
        (causal attention within the prompt; oneDNN's matrix products, as for several decode rows)."""
        heads, dim, length = self.heads, self.head_dim, len(prompt)
        tokens = torch.tensor(prompt, device=keys.device)
        x = self.embed[tokens].float()
        cos, sin = self.rotary(x, torch.arange(length, device=keys.device)[None])  # (1, length, dim)
        cos, sin = cos[0, :, None], self._signed(sin[0, :, None])
        with self._onednn(length):
            for layer, (n1, e1, qkv_w, o_w, n2, e2, gu_w, down_w) in enumerate(self.layers):
                qk, v = self._attention_inputs(x, n1, e1, qkv_w, cos, sin)
                k, v = qk[:, heads:].transpose(0, 1), v.transpose(0, 1)  # (kv, length, dim)
                keys[layer, slot, :, :length] = k
                values[layer, slot, :, :length] = v
                attended = F.scaled_dot_product_attention(
                    qk[:, :heads].transpose(0, 1)[None], k[None], v[None], is_causal=True, enable_gqa=True
                )[0]  # (heads, length, dim)
                flat = attended.transpose(0, 1).reshape(length, heads * dim).to(torch.bfloat16)
                x.add_(o_w(flat))
                self._mlp(x, n2, e2, gu_w, down_w)
            return self.head(self._norm(x[-1:], *self.norm)).float()[0]

    def _compiled(self):
        """decode_native's compiled one-row step over these weights (made at the first one-row step), or None
        where it cannot run here."""
        if self._native is None:
            from llama_lora.infer import decode_native

            self._native = decode_native.step_for(self) or False
        return self._native or None

    @staticmethod
    def _signed(sin: torch.Tensor) -> torch.Tensor:
        """rotate_half(t) * sin == roll(t, dim/2) * (sin with its first half negated)."""
        dim = sin.shape[-1]
        return sin * torch.cat((-sin.new_ones(dim // 2), sin.new_ones(dim - dim // 2)))

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Float32 logits (B, vocab) for `tokens` (B,) at `positions` (B,); each row's key and value are
        written into `keys`/`values` (layers, slots, kv heads, capacity, head dim) at row b, `positions[b]`,
        and row b attends to its positions 0..positions[b]."""
        rows, width = tokens.shape[0], int(positions.max()) + 1
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        index = torch.arange(rows, device=tokens.device)
        x = self.embed[tokens].float()
        cos, sin = self.rotary(x, positions[:, None])  # (rows, 1, dim): the model's own rotary embedding
        sin = self._signed(sin)
        if rows == 1 and self._compiled() is not None:  # one sequence: the same step in C++ (module doc)
            with self._onednn(1):
                return self._native.run(x, width - 1, keys, values, 0, cos.reshape(-1), sin.reshape(-1))
        bias = None  # one row sees all its positions; several: each hides the positions past its own
        if rows > 1:
            hidden = torch.arange(width, device=tokens.device)[None, :] > positions[:, None]
            bias = torch.zeros(rows, kv, 1, width, device=tokens.device).masked_fill_(
                hidden[:, None, None], -torch.inf
            )
            bias = bias.view(rows * kv, 1, width)
        with self._onednn(rows):
            for layer, (n1, e1, qkv_w, o_w, n2, e2, gu_w, down_w) in enumerate(self.layers):
                qk, v = self._attention_inputs(x, n1, e1, qkv_w, cos, sin)
                k_cache, v_cache = keys[layer], values[layer]
                k_cache[index, :, positions] = qk[:, heads:]
                v_cache[index, :, positions] = v
                q = qk[:, :heads].reshape(rows * kv, heads // kv, dim)
                k_seen = k_cache[:rows, :, :width].view(rows * kv, width, dim).transpose(1, 2)
                if bias is None:
                    scores = torch.bmm(q, k_seen).mul_(self.scale)
                else:
                    scores = torch.baddbmm(bias, q, k_seen, alpha=self.scale)
                v_seen = v_cache[:rows, :, :width].view(rows * kv, width, dim)
                attended = torch.bmm(torch.softmax(scores, -1), v_seen)
                x.add_(o_w(attended.view(rows, heads * dim).to(torch.bfloat16)))
                self._mlp(x, n2, e2, gu_w, down_w)
            return self.head(self._norm(x, *self.norm)).float()
